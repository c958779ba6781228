//! The session's confidentiality and integrity: an ephemeral X25519 exchange inside the
//! authenticated handshake, HKDF-SHA256 over the shared secret and the pre-shared key, and an
//! AES-128-GCM record layer under the frames. Pure (no I/O): the session's reader and writer
//! feed it bytes.
//!
//! Why this shape: the HMAC handshake already binds both Hellos, so carrying an ephemeral public
//! key in each Hello makes the exchange authenticated by the same tags (an on-path attacker
//! cannot substitute its own key without failing them), and the session keys depend on
//! ephemeral secrets discarded right after the handshake (forward secrecy: a key file stolen
//! later decrypts nothing recorded earlier). The pre-shared key is mixed into the key
//! derivation too, so the keys need both. AES-128-GCM rather than AES-256-GCM: 1.1–1.5× its
//! speed on this machine (`record_speed` below; the GHASH half costs the same), and TLS 1.3's
//! mandatory suite. Without a key (`--allow-unauthenticated`) the
//! exchange is anonymous: it only stops passive capture.
//!
//! Records, after the handshake, in each direction:
//! ```text
//! | len u32 LE | AES-128-GCM(plaintext frames) | tag (16) |
//! ```
//! `len` counts ciphertext plus tag and is the record's associated data; the nonce is a
//! per-direction counter, so a record dropped, replayed, reordered or altered fails
//! authentication, and that ends the session. Frames are a byte stream across records: a
//! record holds up to [`MAX_RECORD`] bytes of whatever the writer batched (normally one
//! batch of whole frames).

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use ring::{aead, agreement, hkdf, rand as ring_rand};
use serde::Deserialize;

use crate::endpoint::Endpoint;

/// Most plaintext bytes in one record. Above the writer's 1 MiB batch (plus the frame that
/// crosses it), so a batch is one record holding whole frames: the reader then frames the
/// decrypted record in place, without copying it again. Also the most a reader buffers
/// before it can authenticate.
pub const MAX_RECORD: usize = 4 << 20;
/// Bytes a record adds: the length prefix and the tag.
pub const RECORD_OVERHEAD: usize = 4 + TAG_LEN;
const TAG_LEN: usize = 16;
/// Length of an X25519 public key as carried in the Hello.
pub const PUBLIC_KEY_LEN: usize = 32;

const KDF_SALT: &[u8] = b"dpu-offload session keys v3";

/// A record that cannot be accepted; always ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The record length is above the limit (checked before anything is allocated).
    #[error("encrypted record of {0} bytes exceeds the limit of {max}", max = MAX_RECORD + TAG_LEN)]
    TooLarge(usize),
    /// The record cannot even hold its tag.
    #[error("encrypted record of {0} bytes is shorter than its tag")]
    TooShort(usize),
    /// The AES-GCM tag does not verify.
    #[error("record failed authentication (altered, replayed or reordered on the link)")]
    Authentication,
    /// X25519 refused the peer's public key (e.g. a low-order point).
    #[error("key exchange failed (invalid peer public key)")]
    KeyExchange,
    /// The 64-bit record counter would wrap; the session must end rather than reuse a nonce.
    #[error("no more nonces on this session")]
    Exhausted,
}

/// Whether each kind of link encrypts. A session encrypts when its link kind says so, and
/// both ends must agree: a peer asking for less is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptPolicy {
    /// `tcp://`: on by default (links that cross a network).
    pub tcp: bool,
    /// `unix://`: off by default (same machine).
    pub unix: bool,
    /// `vsock://`: off by default (physically contained).
    pub vsock: bool,
    /// `vsock-uds://`: off by default (physically contained).
    pub vsock_uds: bool,
    /// `rdma://`: off by default (a PCIe/RDMA fabric inside the box).
    pub rdma: bool,
}

impl Default for EncryptPolicy {
    fn default() -> Self {
        EncryptPolicy {
            tcp: true,
            unix: false,
            vsock: false,
            vsock_uds: false,
            rdma: false,
        }
    }
}

impl EncryptPolicy {
    /// The same setting for every link kind (e.g. from `--encrypt`).
    pub fn all(on: bool) -> Self {
        EncryptPolicy {
            tcp: on,
            unix: on,
            vsock: on,
            vsock_uds: on,
            rdma: on,
        }
    }

    /// Whether a session over `ep`'s kind of link encrypts.
    pub fn for_endpoint(&self, ep: &Endpoint) -> bool {
        match ep {
            Endpoint::Tcp { .. } => self.tcp,
            Endpoint::Unix { .. } => self.unix,
            Endpoint::Vsock { .. } => self.vsock,
            Endpoint::VsockUds { .. } => self.vsock_uds,
            Endpoint::Rdma { .. } => self.rdma,
        }
    }
}

/// The `[transport]` section of `host.toml`/`dpu.toml`: per link kind settings.
///
/// ```toml
/// [transport.tcp]
/// encrypt = true     # the default
/// [transport.vsock]
/// encrypt = false    # the default
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// `[transport.tcp]`: links across a network (encrypted by default).
    #[serde(default)]
    pub tcp: LinkSettings,
    /// `[transport.unix]`: local Unix sockets.
    #[serde(default)]
    pub unix: LinkSettings,
    /// `[transport.vsock]`: host/guest vsock.
    #[serde(default)]
    pub vsock: LinkSettings,
    /// `[transport.vsock-uds]`: hybrid vsock through a Unix socket.
    #[serde(default, rename = "vsock-uds")]
    pub vsock_uds: LinkSettings,
    /// `[transport.rdma]`: RDMA CM links.
    #[serde(default)]
    pub rdma: LinkSettings,
}

/// Settings of one link kind.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    /// Encrypt sessions over this kind of link (unset: the kind's default).
    pub encrypt: Option<bool>,
}

impl TransportConfig {
    /// The policy this section describes, over the defaults.
    pub fn encrypt_policy(&self) -> EncryptPolicy {
        let d = EncryptPolicy::default();
        EncryptPolicy {
            tcp: self.tcp.encrypt.unwrap_or(d.tcp),
            unix: self.unix.encrypt.unwrap_or(d.unix),
            vsock: self.vsock.encrypt.unwrap_or(d.vsock),
            vsock_uds: self.vsock_uds.encrypt.unwrap_or(d.vsock_uds),
            rdma: self.rdma.encrypt.unwrap_or(d.rdma),
        }
    }
}

/// This side's ephemeral key pair for one handshake.
pub(crate) struct Ephemeral {
    private: agreement::EphemeralPrivateKey,
    public: [u8; PUBLIC_KEY_LEN],
}

impl Ephemeral {
    /// A fresh key pair (from the OS's random source).
    pub(crate) fn generate() -> Result<Ephemeral, CryptoError> {
        let rng = ring_rand::SystemRandom::new();
        let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| CryptoError::KeyExchange)?;
        let public = private
            .compute_public_key()
            .map_err(|_| CryptoError::KeyExchange)?;
        let public: [u8; PUBLIC_KEY_LEN] = public
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError::KeyExchange)?;
        Ok(Ephemeral { private, public })
    }

    /// The public half, sent in the Hello.
    pub(crate) fn public(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public
    }

    /// Both directions' record keys. `transcript` is every handshake byte both sides
    /// authenticated (the two Hellos, dialer's first); `dialer` picks which key seals.
    pub(crate) fn derive(
        self,
        peer_public: &[u8; PUBLIC_KEY_LEN],
        psk: Option<&[u8]>,
        transcript: &[&[u8]],
        dialer: bool,
    ) -> Result<(Sealer, Opener), CryptoError> {
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer_public);
        let psk = psk.unwrap_or_default();
        let prk = agreement::agree_ephemeral(self.private, &peer, |shared| {
            // An all-zero secret means a low-order peer key: nothing secret was agreed.
            if shared.iter().all(|b| *b == 0) {
                return None;
            }
            let mut ikm = Vec::with_capacity(shared.len() + psk.len());
            ikm.extend_from_slice(shared);
            ikm.extend_from_slice(psk);
            Some(hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(&ikm))
        })
        .map_err(|_| CryptoError::KeyExchange)?
        .ok_or(CryptoError::KeyExchange)?;
        let th = {
            let mut h = ring::digest::Context::new(&ring::digest::SHA256);
            for part in transcript {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part);
            }
            h.finish()
        };
        let key = |dir: &[u8]| -> Result<aead::LessSafeKey, CryptoError> {
            let info = [dir, th.as_ref()];
            let okm = prk
                .expand(&info, &aead::AES_128_GCM)
                .map_err(|_| CryptoError::KeyExchange)?;
            Ok(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
        };
        let c2s = key(b"dialer to acceptor")?;
        let s2c = key(b"acceptor to dialer")?;
        let (seal, open) = if dialer { (c2s, s2c) } else { (s2c, c2s) };
        Ok((
            Sealer {
                key: seal,
                counter: 0,
            },
            Opener {
                key: open,
                counter: 0,
                last: 0,
            },
        ))
    }
}

fn nonce(counter: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// Seals outgoing bytes into records (this side's direction key and nonce counter).
pub struct Sealer {
    key: aead::LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("counter", &self.counter)
            .finish()
    }
}

/// One piece of plaintext for [`Sealer::seal_pieces`]. Each piece becomes its own record(s),
/// so a bulk payload queued as its own piece starts a record and the reader can hand it on
/// without copying it.
pub enum Piece {
    /// Bytes the caller owns: sealed where they are (no copy).
    Owned(BytesMut),
    /// Bytes possibly shared with others: sealed in place when this is the only reference
    /// ([`Bytes::try_into_mut`]), else copied once into the record.
    Shared(Bytes),
}

impl Sealer {
    /// Seals the concatenation of `chunks` into records of at most [`MAX_RECORD`] plaintext
    /// bytes each, appended to `out` in wire form (one copy; tests and fuzzing).
    pub fn seal<'a>(
        &mut self,
        chunks: impl IntoIterator<Item = &'a [u8]>,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), CryptoError> {
        let mut all = BytesMut::new();
        for c in chunks {
            all.extend_from_slice(c);
        }
        self.seal_pieces([Piece::Owned(all)], out)
    }

    /// Seals each piece into its own records (a piece above [`MAX_RECORD`] into several),
    /// appended to `out` in wire form: the length prefixes and tags are small chunks of
    /// their own between the ciphertexts, so owned pieces are encrypted where they lie and
    /// written with one vectored write. Empty pieces are skipped.
    pub fn seal_pieces(
        &mut self,
        pieces: impl IntoIterator<Item = Piece>,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), CryptoError> {
        // Length prefixes and tags, in one small buffer: `tag(k) len(k+1)` between records.
        let mut glue = BytesMut::with_capacity(64);
        for piece in pieces {
            let mut owned = match piece {
                Piece::Owned(b) => b,
                Piece::Shared(b) => match b.try_into_mut() {
                    Ok(m) => m,
                    Err(shared) => {
                        // Copied record by record, each sealed while it is hot in the cache.
                        let mut rest = &shared[..];
                        while !rest.is_empty() {
                            let n = rest.len().min(MAX_RECORD);
                            let mut rec = BytesMut::with_capacity(n);
                            rec.extend_from_slice(&rest[..n]);
                            rest = &rest[n..];
                            self.seal_one(rec, &mut glue, out)?;
                        }
                        continue;
                    }
                },
            };
            while owned.len() > MAX_RECORD {
                let head = owned.split_to(MAX_RECORD);
                self.seal_one(head, &mut glue, out)?;
            }
            if !owned.is_empty() {
                self.seal_one(owned, &mut glue, out)?;
            }
        }
        if !glue.is_empty() {
            out.push_back(glue.freeze());
        }
        Ok(())
    }

    /// Seals one record's plaintext in place; its length goes to `glue` (flushed to `out`
    /// before the ciphertext), its tag stays in `glue` for the next flush.
    fn seal_one(
        &mut self,
        mut pt: BytesMut,
        glue: &mut BytesMut,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), CryptoError> {
        let len = ((pt.len() + TAG_LEN) as u32).to_le_bytes();
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(len), &mut pt[..])
            .map_err(|_| CryptoError::Authentication)?;
        glue.put_slice(&len);
        out.push_back(glue.split().freeze());
        out.push_back(pt.freeze());
        glue.put_slice(tag.as_ref());
        Ok(())
    }

    fn next_nonce(&mut self) -> Result<aead::Nonce, CryptoError> {
        let n = nonce(self.counter);
        self.counter = self.counter.checked_add(1).ok_or(CryptoError::Exhausted)?;
        Ok(n)
    }
}

/// Opens incoming records (the peer's direction key and nonce counter).
pub struct Opener {
    key: aead::LessSafeKey,
    counter: u64,
    /// Wire size of the recent big records: the reader's next buffer is made this big, so a
    /// bulk record lands in one buffer instead of being moved when its size becomes known.
    last: usize,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("counter", &self.counter)
            .finish()
    }
}

/// The ciphertext length a record header announces, checked against the limits.
pub fn record_len(head: [u8; 4]) -> Result<usize, CryptoError> {
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_RECORD + TAG_LEN {
        return Err(CryptoError::TooLarge(len));
    }
    if len < TAG_LEN {
        return Err(CryptoError::TooShort(len));
    }
    Ok(len)
}

impl Opener {
    /// Buffer size that holds the next record if it is as big as the recent big ones.
    pub fn size_hint(&self) -> usize {
        self.last
    }

    /// Opens the record at the front of `raw` and returns its plaintext, split off `raw`
    /// without copying (decrypted where it lies). `None`: the record is not complete yet;
    /// `raw` then has room reserved for all of it, so the next reads complete it.
    pub fn open_record(&mut self, raw: &mut BytesMut) -> Result<Option<BytesMut>, CryptoError> {
        if raw.len() < 4 {
            return Ok(None);
        }
        let head = [raw[0], raw[1], raw[2], raw[3]];
        let len = record_len(head)?;
        if raw.len() < 4 + len {
            raw.reserve(4 + len - raw.len());
            return Ok(None);
        }
        let mut rec = raw.split_to(4 + len);
        let next = self.counter.checked_add(1).ok_or(CryptoError::Exhausted)?;
        self.key
            .open_in_place(nonce(self.counter), aead::Aad::from(head), &mut rec[4..])
            .map_err(|_| CryptoError::Authentication)?;
        self.counter = next;
        // Bulk records alternate with small ones (frame headers, control frames): keep the
        // size of the recent big ones, decaying slowly.
        self.last = (4 + len).max(self.last - self.last / 16);
        let _ = rec.split_to(4);
        rec.truncate(len - TAG_LEN);
        Ok(Some(rec))
    }

    /// Opens every complete record at the front of `raw` and appends its plaintext to
    /// `plain`; an incomplete record stays in `raw` for more bytes.
    pub fn open(&mut self, raw: &mut BytesMut, plain: &mut BytesMut) -> Result<(), CryptoError> {
        while let Some(rec) = self.open_record(raw)? {
            if plain.is_empty() {
                *plain = rec;
            } else {
                plain.extend_from_slice(&rec);
            }
        }
        Ok(())
    }
}

/// A sealer and an opener on one fixed key (fuzzing and tests; never on a link).
fn fixed_pair() -> Option<(Sealer, Opener)> {
    let key = || {
        aead::UnboundKey::new(&aead::AES_128_GCM, &[9; 16])
            .ok()
            .map(aead::LessSafeKey::new)
    };
    Some((
        Sealer {
            key: key()?,
            counter: 0,
        },
        Opener {
            key: key()?,
            counter: 0,
            last: 0,
        },
    ))
}

/// Fuzzing entry: the record reader over the byte stream a peer sends after the handshake.
/// The first byte picks a split: the bytes before it are sealed (so the decrypting path is
/// reached), the rest follow as they are, fed in pieces; the plaintext that comes out must
/// be exactly what was sealed, or a prefix of it when the rest is refused.
#[doc(hidden)]
pub fn fuzz_records(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let Some((mut seal, mut open)) = fixed_pair() else {
        return;
    };
    let split = (split as usize * data.len() / 255).min(data.len());
    let (sealed, tail) = data.split_at(split);
    let mut out = VecDeque::new();
    if seal.seal([sealed], &mut out).is_err() {
        return;
    }
    let mut stream: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
    stream.extend_from_slice(tail);
    let mut raw = BytesMut::new();
    let mut got = Vec::new();
    for piece in stream.chunks(7919) {
        raw.extend_from_slice(piece);
        let mut plain = BytesMut::new();
        let res = open.open(&mut raw, &mut plain);
        got.extend_from_slice(&plain);
        if res.is_err() {
            break;
        }
    }
    assert!(got.len() <= sealed.len() && got[..] == sealed[..got.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(psk_a: &[u8], psk_b: &[u8]) -> ((Sealer, Opener), (Sealer, Opener)) {
        let a = Ephemeral::generate().unwrap();
        let b = Ephemeral::generate().unwrap();
        let (pa, pb) = (a.public(), b.public());
        let t: &[&[u8]] = &[b"hello-d", b"hello-a"];
        (
            a.derive(&pb, Some(psk_a), t, true).unwrap(),
            b.derive(&pa, Some(psk_b), t, false).unwrap(),
        )
    }

    /// A sealer/opener pair on a fixed key (ring keys cannot be cloned, and the tamper test
    /// needs a fresh opener per attempt).
    fn fixed() -> (Sealer, impl Fn() -> Opener) {
        let (seal, _) = fixed_pair().unwrap();
        (seal, || fixed_pair().unwrap().1)
    }

    #[test]
    fn fuzz_entry_runs_on_its_edge_cases() {
        for data in [
            &b""[..],
            &b"\x00"[..],
            &b"\xffsealed entirely"[..],
            &b"\x80half sealed, half garbage after it"[..],
            &[0u8, 0xff, 0xff, 0xff, 0x7f][..],
            &[0u8, 20, 0, 0, 0, 1, 2, 3][..],
        ] {
            fuzz_records(data);
        }
    }

    fn wire(out: VecDeque<Bytes>) -> BytesMut {
        let mut raw = BytesMut::new();
        for b in out {
            raw.extend_from_slice(&b);
        }
        raw
    }

    #[test]
    fn round_trip_across_records_and_partial_reads() {
        let ((mut seal, _), (_, mut open)) = pair(&[1; 32], &[1; 32]);
        let big: Vec<u8> = (0..(MAX_RECORD * 2 + 123)).map(|i| i as u8).collect();
        let mut out = VecDeque::new();
        seal.seal([&b"head"[..], &big[..], &b""[..], &b"tail"[..]], &mut out)
            .unwrap();
        seal.seal([&b"second batch"[..]], &mut out).unwrap();
        let raw = wire(out);
        assert_eq!(raw.len(), 8 + big.len() + 12 + 4 * RECORD_OVERHEAD);
        // Fed in odd-sized pieces, as reads deliver them.
        let mut got = BytesMut::new();
        let mut pending = BytesMut::new();
        for piece in raw.chunks(77_777) {
            pending.extend_from_slice(piece);
            let mut plain = BytesMut::new();
            open.open(&mut pending, &mut plain).unwrap();
            got.extend_from_slice(&plain);
        }
        assert!(pending.is_empty());
        let mut want = b"head".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tailsecond batch");
        assert!(got[..] == want[..]);
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let (mut seal, opener) = fixed();
        let mut out = VecDeque::new();
        seal.seal([&b"secret marker"[..]], &mut out).unwrap();
        let raw = wire(out);
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x04;
            let mut plain = BytesMut::new();
            let res = opener().open(&mut bad, &mut plain);
            assert!(plain.is_empty(), "flip at {i} yielded plaintext");
            if i >= 4 {
                assert_eq!(res, Err(CryptoError::Authentication), "flip at {i}");
            } else {
                // The length is associated data: a changed length is too large, too short,
                // incomplete (waits for bytes that never authenticate) or fails the tag.
                assert!(res.is_err() || !bad.is_empty(), "flip at {i}");
            }
        }
        let mut ok = raw.clone();
        let mut plain = BytesMut::new();
        opener().open(&mut ok, &mut plain).unwrap();
        assert_eq!(&plain[..], b"secret marker");
    }

    #[test]
    fn replayed_and_reordered_records_are_refused() {
        let (mut seal, opener) = fixed();
        let mut one = VecDeque::new();
        seal.seal([&b"one"[..]], &mut one).unwrap();
        let mut two = VecDeque::new();
        seal.seal([&b"two"[..]], &mut two).unwrap();
        let (r1, r2) = (wire(one), wire(two));
        let mut plain = BytesMut::new();
        assert_eq!(
            opener().open(&mut BytesMut::from(&r2[..]), &mut plain),
            Err(CryptoError::Authentication)
        );
        let mut o = opener();
        o.open(&mut BytesMut::from(&r1[..]), &mut plain).unwrap();
        assert_eq!(&plain[..], b"one");
        assert_eq!(
            o.open(&mut BytesMut::from(&r1[..]), &mut BytesMut::new()),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn different_psk_means_different_keys() {
        let ((mut seal, _), (_, mut open)) = pair(&[1; 32], &[2; 32]);
        let mut out = VecDeque::new();
        seal.seal([&b"data"[..]], &mut out).unwrap();
        let mut raw = wire(out);
        let mut plain = BytesMut::new();
        assert_eq!(
            open.open(&mut raw, &mut plain),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn both_directions_use_their_own_keys() {
        let ((mut d_seal, mut d_open), (mut a_seal, mut a_open)) = pair(&[1; 32], &[1; 32]);
        let mut out = VecDeque::new();
        d_seal.seal([&b"to acceptor"[..]], &mut out).unwrap();
        let to_a = wire(std::mem::take(&mut out));
        a_seal.seal([&b"to dialer"[..]], &mut out).unwrap();
        let to_d = wire(out);
        // A record reflected back to its sender is refused.
        assert!(d_open
            .open(&mut to_a.clone(), &mut BytesMut::new())
            .is_err());
        let mut p = BytesMut::new();
        a_open.open(&mut to_a.clone(), &mut p).unwrap();
        assert_eq!(&p[..], b"to acceptor");
        let mut p = BytesMut::new();
        d_open.open(&mut to_d.clone(), &mut p).unwrap();
        assert_eq!(&p[..], b"to dialer");
    }

    #[test]
    fn low_order_peer_key_is_refused() {
        let a = Ephemeral::generate().unwrap();
        assert_eq!(
            a.derive(&[0; 32], None, &[], true).map(|_| ()).unwrap_err(),
            CryptoError::KeyExchange
        );
    }

    #[test]
    fn oversized_and_undersized_records_refused() {
        assert_eq!(
            record_len(((MAX_RECORD + TAG_LEN + 1) as u32).to_le_bytes()),
            Err(CryptoError::TooLarge(MAX_RECORD + TAG_LEN + 1))
        );
        assert_eq!(
            record_len(3u32.to_le_bytes()),
            Err(CryptoError::TooShort(3))
        );
        assert_eq!(record_len(16u32.to_le_bytes()), Ok(16));
    }

    #[test]
    fn policy_defaults_and_config() {
        let tcp: Endpoint = "tcp://127.0.0.1:1".parse().unwrap();
        let vsock: Endpoint = "vsock://3:1".parse().unwrap();
        assert!(EncryptPolicy::default().for_endpoint(&tcp));
        assert!(!EncryptPolicy::default().for_endpoint(&vsock));
        let c = TransportConfig {
            tcp: LinkSettings {
                encrypt: Some(false),
            },
            vsock: LinkSettings {
                encrypt: Some(true),
            },
            ..Default::default()
        };
        let p = c.encrypt_policy();
        assert!(!p.for_endpoint(&tcp));
        assert!(p.for_endpoint(&vsock));
        assert!(!p.rdma);
        assert!(EncryptPolicy::all(true).rdma);
    }
}

/// Raw speed of the record layer on this machine (not a pass/fail test):
/// `cargo test -p offload-transport --release --lib record_speed -- --ignored --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore]
    fn record_speed() {
        let (mut seal, _) = fixed_pair().unwrap();
        let (_, mut open) = fixed_pair().unwrap();
        let body = vec![7u8; 1 << 20];
        let n = 256;
        // One record at a time, as the session does (buffers come back to the allocator).
        let (mut ts, mut to) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for _ in 0..n {
            let t = std::time::Instant::now();
            let mut out = VecDeque::new();
            seal.seal([&body[..12], &body[..]], &mut out).unwrap();
            let r = out.pop_front().unwrap();
            ts += t.elapsed();
            let mut raw = BytesMut::from(&r[..]);
            drop(r);
            let t = std::time::Instant::now();
            let mut plain = BytesMut::new();
            open.open(&mut raw, &mut plain).unwrap();
            to += t.elapsed();
            assert_eq!(plain.len(), body.len() + 12);
        }
        let mb = (n as f64) * (1 << 20) as f64 / 1e6;
        let (ts, to) = (ts, to);
        // Scale for this machine's load: a plain copy of the same bytes.
        let t = std::time::Instant::now();
        let mut dst = vec![0u8; 1 << 20];
        for i in 0..n {
            dst.copy_from_slice(&body);
            dst[i % 7] ^= 1;
        }
        std::hint::black_box(&dst);
        println!("memcpy: {:.0} MB/s", mb / t.elapsed().as_secs_f64());
        let key =
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &[1; 32]).unwrap());
        let t = std::time::Instant::now();
        for i in 0..n {
            let _ = key
                .seal_in_place_separate_tag(nonce(i as u64), aead::Aad::empty(), &mut dst)
                .unwrap();
        }
        println!(
            "ring AES-256-GCM in place: {:.0} MB/s",
            mb / t.elapsed().as_secs_f64()
        );
        for (name, alg) in [
            ("AES-128-GCM", &aead::AES_128_GCM),
            ("ChaCha20-Poly1305", &aead::CHACHA20_POLY1305),
        ] {
            let key = aead::LessSafeKey::new(
                aead::UnboundKey::new(alg, &[1; 32][..alg.key_len()]).unwrap(),
            );
            let t = std::time::Instant::now();
            for i in 0..n {
                let _ = key
                    .seal_in_place_separate_tag(nonce(i as u64), aead::Aad::empty(), &mut dst)
                    .unwrap();
            }
            println!(
                "ring {name} in place: {:.0} MB/s",
                mb / t.elapsed().as_secs_f64()
            );
        }
        println!(
            "seal (copy + encrypt): {:.0} MB/s, open (decrypt in place): {:.0} MB/s",
            mb / ts.as_secs_f64(),
            mb / to.as_secs_f64()
        );
    }
}
