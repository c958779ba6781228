//! The session handshake as a state machine without I/O: a [`Handshake`] (dialer or acceptor)
//! is fed the handshake frames the peer sent and answers with the bytes to send and, at the
//! end, the [`Negotiated`] parameters (peer services and limits, the dialer's Auth, the record
//! keys for [`crate::crypto`]) or a typed [`HandshakeError`]. Randomness (the nonce, the
//! ephemeral key) comes in from outside, so two cores can be run against each other in memory;
//! [`crate::session`]'s `handshake()` is a thin loop that reads a frame, feeds it and writes
//! what comes out.
//!
//! ```text
//! dialer                               acceptor
//!   Hello_d                  ──▶
//!                            ◀──  Hello_a, Welcome{S tag} | Refuse
//!   Auth{C tag}, frames…     ──▶  (verified before any frame is read)
//!                            ◀──  Refuse (wrong key only)
//! ```
//!
//! The acceptor proves the key first, so the dialer knows who it talks to before it sends
//! anything but its Hello, and can send its own proof together with its first frames: 1 round
//! trip instead of 2. Both Hellos carry an ephemeral X25519 key and the side's encryption
//! policy for the link; the tags cover both Hellos (fresh nonces: a recorded proof is useless
//! in another handshake), so the exchange is authenticated by the pre-shared key. When
//! encrypting, everything after Welcome (acceptor) and Auth (dialer) is sealed records.

use bytes::{Bytes, BytesMut};

use crate::auth::{Key, Secret};
use crate::crypto::{Ephemeral, Opener, Sealer, PUBLIC_KEY_LEN};
use crate::session::HandshakeError;
use crate::wire::{self, Header, Kind, WireError, HEADER_LEN};

/// Largest handshake message; a Hello lists a few service names.
pub(crate) const MAX_HANDSHAKE_FRAME: u32 = 16 * 1024;

/// Extended Hello: the base message plus the limits the peer must respect.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct HelloMsg {
    pub hello: wire::Hello,
    pub stream_window: u32,
    pub max_frame: u32,
}

/// Version 3's addition to the Hello, encoded right after [`HelloMsg`] so that a version 2
/// peer still decodes the Hello and reports the version mismatch by name (postcard ignores
/// trailing bytes).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct HelloExt {
    /// Whether this side encrypts the session (its policy for this link kind).
    pub encrypt: bool,
    /// This side's ephemeral X25519 public key (zeros when not encrypting).
    pub dh: [u8; PUBLIC_KEY_LEN],
}

/// The dialer's addition after [`HelloExt`] (older peers ignore it): which of the acceptor's
/// keys to prove itself with during a key rotation.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct HelloHint {
    /// The first [`HINT_LEN`] bytes of HMAC(dialer's key, [`HINT_CONTEXT`] ‖ dialer's nonce).
    pub key_hint: [u8; HINT_LEN],
}

const AUTH_CONTEXT: &[u8] = b"dpu-offload session auth v1";
/// Domain of the key hint's HMAC (never equal to a tag's input).
const HINT_CONTEXT: &[u8] = b"dpu-offload key hint v1";
/// Bytes of the key hint: enough that a random one matches no key in practice.
pub(crate) const HINT_LEN: usize = 16;

/// What the handshake settled.
pub(crate) struct Negotiated {
    pub peer_services: Vec<String>,
    pub peer_window: u32,
    pub peer_max_frame: u32,
    /// Dialer only: its Auth frame, written by the session's writer ahead of the first frames
    /// (one write, no extra round trip).
    pub auth: Option<BytesMut>,
    /// The record keys of an encrypted session.
    pub cipher: Option<(Sealer, Opener)>,
}

/// What a Hello carries: the base message, then (if present) the extension and the hint.
type HelloParts = (HelloMsg, Option<HelloExt>, Option<HelloHint>);

/// Parses a handshake frame header: anything but a header of ours at this point means another
/// protocol answered.
pub(crate) fn parse_header(b: &[u8; HEADER_LEN]) -> Result<Header, HandshakeError> {
    Header::parse(b, MAX_HANDSHAKE_FRAME).map_err(|_| HandshakeError::NotOffload)
}

/// Decodes the peer's first handshake frame: anything but a well-formed Hello carrying our
/// magic means the peer is not a dpu-offload endpoint. The extension is `None` when absent
/// (an older peer, refused by the version check), the hint when the peer sends none (an
/// acceptor, or a dialer from before key rotation).
pub(crate) fn decode_hello(kind: Kind, body: &[u8]) -> Result<HelloParts, HandshakeError> {
    if kind != Kind::Hello {
        return Err(HandshakeError::NotOffload);
    }
    let (theirs, rest): (HelloMsg, _) =
        postcard::take_from_bytes(body).map_err(|_| HandshakeError::NotOffload)?;
    if theirs.hello.magic != wire::MAGIC {
        return Err(HandshakeError::NotOffload);
    }
    let (ext, hint) = match postcard::take_from_bytes::<HelloExt>(rest) {
        Ok((ext, rest)) => (Some(ext), postcard::from_bytes::<HelloHint>(rest).ok()),
        Err(_) => (None, None),
    };
    Ok((theirs, ext, hint))
}

/// Encodes a Hello with its extension and hint (the hint only after an extension).
pub(crate) fn encode_hello(
    msg: &HelloMsg,
    ext: Option<&HelloExt>,
    hint: Option<&HelloHint>,
) -> Bytes {
    let mut out = BytesMut::from(&wire::encode(msg)[..]);
    if let Some(ext) = ext {
        out.extend_from_slice(&wire::encode(ext));
        if let Some(hint) = hint {
            out.extend_from_slice(&wire::encode(hint));
        }
    }
    out.freeze()
}

/// The dialer's key hint for `nonce` under `key`.
pub(crate) fn key_hint(key: &Secret, nonce: &[u8]) -> HelloHint {
    let tag = key.tag(&[HINT_CONTEXT, nonce]);
    let mut key_hint = [0u8; HINT_LEN];
    key_hint.copy_from_slice(&tag[..HINT_LEN]);
    HelloHint { key_hint }
}

/// The acceptor's choice among its keys: the one the dialer's hint matches, else the first.
pub(crate) fn pick_key<'a>(
    keys: &'a [Secret],
    nonce: &[u8],
    hint: Option<&HelloHint>,
) -> Option<&'a Secret> {
    hint.and_then(|h| {
        keys.iter()
            .find(|k| k.verify_prefix(&[HINT_CONTEXT, nonce], &h.key_hint))
    })
    .or(keys.first())
}

/// A handshake frame (id 0).
pub(crate) fn frame(kind: Kind, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    Header {
        len: body.len() as u32,
        kind,
        id: 0,
    }
    .put(&mut out);
    out.extend_from_slice(body);
    out
}

fn refuse(reason: &str) -> BytesMut {
    frame(
        Kind::Refuse,
        &wire::encode(&wire::Refuse {
            reason: reason.into(),
        }),
    )
}

/// This side's settings for one handshake.
pub(crate) struct Params {
    /// This side connected (and proves its key second).
    pub dialer: bool,
    /// This side's encryption policy for the link; the peer's must be the same.
    pub encrypt: bool,
    /// The keys as they are for this handshake: the one to prove with first, then any other
    /// accepted during a rotation. Empty: unauthenticated.
    pub secrets: Vec<Secret>,
    /// Services this side offers.
    pub services: Vec<String>,
    /// This side's per-stream receive window.
    pub stream_window: u32,
    /// This side's frame limit.
    pub max_frame: u32,
}

/// What the peer's Hello settled that later steps need.
struct Peer {
    /// The Hello's bytes as sent (the transcript the tags cover).
    hello: Bytes,
    msg: HelloMsg,
    ext: HelloExt,
}

// One per handshake, moved a handful of times: not worth boxing.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Waiting for the peer's Hello.
    Hello,
    /// Dialer: waiting for Welcome or Refuse.
    Welcome(Peer),
    /// Dialer: the acceptor proved no key of ours; our proof went out so that its Refuse
    /// names the reason.
    Refuse,
    /// Acceptor: Welcome sent, waiting for the dialer's Auth.
    Auth {
        peer: Peer,
        key: Option<Secret>,
        cipher: Option<(Sealer, Opener)>,
    },
    /// Finished (either way).
    Over,
}

/// What the driver does after feeding a frame.
// Done (the record keys) is returned once per handshake: not worth boxing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Next {
    /// Write [`Output::send`], then read and feed the next frame.
    More,
    /// Write [`Output::send`] (if any); the session starts with these parameters.
    Done(Negotiated),
    /// Try to write [`Output::send`] (a Refuse for the peer), then fail with this.
    Failed(HandshakeError),
}

/// Bytes to write and what comes next.
pub(crate) struct Output {
    /// Handshake frames for the peer, in one write (may be empty).
    pub send: BytesMut,
    /// Whether the handshake goes on, finished or failed.
    pub next: Next,
}

impl Output {
    fn more(send: BytesMut) -> Output {
        Output {
            send,
            next: Next::More,
        }
    }

    fn fail(e: impl Into<HandshakeError>) -> Output {
        Output::refuse(BytesMut::new(), e)
    }

    fn refuse(send: BytesMut, e: impl Into<HandshakeError>) -> Output {
        Output {
            send,
            next: Next::Failed(e.into()),
        }
    }
}

/// One side's handshake (see the module docs).
pub(crate) struct Handshake {
    p: Params,
    eph: Option<Ephemeral>,
    /// Our Hello's bytes (the transcript) and its frame.
    mine: Bytes,
    my_hello: BytesMut,
    state: State,
}

impl Handshake {
    /// Starts a handshake with a fresh `nonce` and, when encrypting, a fresh ephemeral key.
    /// Returns the bytes to send first (the dialer's Hello; nothing for the acceptor, which
    /// answers the dialer's).
    pub(crate) fn new(p: Params, nonce: [u8; 32], eph: Option<Ephemeral>) -> (Handshake, BytesMut) {
        let mine = HelloMsg {
            hello: wire::Hello {
                magic: wire::MAGIC,
                version: wire::VERSION,
                nonce,
                services: p.services.clone(),
                authenticated: !p.secrets.is_empty(),
            },
            stream_window: p.stream_window,
            max_frame: p.max_frame,
        };
        let ext = HelloExt {
            encrypt: p.encrypt,
            dh: eph.as_ref().map(Ephemeral::public).unwrap_or_default(),
        };
        let hint = match p.secrets.first() {
            Some(k) if p.dialer => Some(key_hint(k, &nonce)),
            _ => None,
        };
        let mine = encode_hello(&mine, Some(&ext), hint.as_ref());
        let my_hello = frame(Kind::Hello, &mine);
        let first = if p.dialer {
            my_hello.clone()
        } else {
            BytesMut::new()
        };
        let hs = Handshake {
            p,
            eph,
            mine,
            my_hello,
            state: State::Hello,
        };
        (hs, first)
    }

    /// The error to report when reading the next frame failed with `e`: after our proof was
    /// refused any end (no Refuse arriving) means the peer could not prove itself.
    pub(crate) fn on_read_error(&mut self, e: HandshakeError) -> HandshakeError {
        match std::mem::replace(&mut self.state, State::Over) {
            State::Refuse => HandshakeError::PeerNotAuthenticated,
            _ => e,
        }
    }

    /// Feeds the peer's next handshake frame.
    pub(crate) fn on_frame(&mut self, kind: Kind, body: &[u8]) -> Output {
        match std::mem::replace(&mut self.state, State::Over) {
            State::Hello => self.on_hello(kind, body),
            State::Welcome(peer) => self.on_welcome(peer, kind, body),
            State::Refuse => match kind {
                Kind::Refuse => match wire::decode::<wire::Refuse>("refuse", body) {
                    Ok(r) => Output::fail(HandshakeError::Rejected(r.reason)),
                    Err(e) => Output::fail(e),
                },
                _ => Output::fail(HandshakeError::PeerNotAuthenticated),
            },
            State::Auth { peer, key, cipher } => self.on_auth(peer, key, cipher, kind, body),
            State::Over => Output::fail(HandshakeError::Unexpected(kind)),
        }
    }

    /// The transcript in its fixed order: (dialer's Hello, acceptor's Hello).
    fn transcript<'a>(&'a self, peer: &'a Peer) -> [&'a [u8]; 2] {
        if self.p.dialer {
            [&self.mine[..], &peer.hello[..]]
        } else {
            [&peer.hello[..], &self.mine[..]]
        }
    }

    /// This side's proof for `role` under `key` (empty without a key).
    fn tag(&self, peer: &Peer, key: Option<&Secret>, role: &[u8]) -> Vec<u8> {
        let [c, s] = self.transcript(peer);
        key.map(|k| k.tag(&[AUTH_CONTEXT, role, c, s]).to_vec())
            .unwrap_or_default()
    }

    /// The record keys, once both sides are known to agree (derived before the peer's proof
    /// is checked, but used only after it).
    fn keys(
        &mut self,
        peer: &Peer,
        psk: Option<&Secret>,
    ) -> Result<Option<(Sealer, Opener)>, HandshakeError> {
        match self.eph.take() {
            Some(eph) => Ok(Some(eph.derive(
                &peer.ext.dh,
                psk.map(Secret::bytes),
                &self.transcript(peer),
                self.p.dialer,
            )?)),
            None => Ok(None),
        }
    }

    fn negotiated(peer: Peer, auth: Option<BytesMut>, cipher: Option<(Sealer, Opener)>) -> Next {
        Next::Done(Negotiated {
            peer_services: peer.msg.hello.services,
            peer_window: peer.msg.stream_window.max(1),
            peer_max_frame: peer.msg.max_frame.max(4096),
            auth,
            cipher,
        })
    }

    fn on_hello(&mut self, kind: Kind, body: &[u8]) -> Output {
        let (msg, ext, hint) = match decode_hello(kind, body) {
            Ok(parts) => parts,
            Err(e) => return Output::fail(e),
        };
        let theirs = msg.hello.version;
        // The acceptor answers every refusal with its Hello and a Refuse naming the reason.
        let refuse_with = |why: &str| {
            let mut send = self.my_hello.clone();
            send.extend_from_slice(&refuse(why));
            send
        };
        if theirs != wire::VERSION {
            let e = HandshakeError::Version {
                ours: wire::VERSION,
                theirs,
            };
            if self.p.dialer {
                return Output::fail(e);
            }
            let why = format!(
                "unsupported protocol version {theirs}; this side speaks {}",
                wire::VERSION
            );
            return Output::refuse(refuse_with(&why), e);
        }
        if !self.p.dialer {
            match (self.p.secrets.is_empty(), msg.hello.authenticated) {
                (false, false) => {
                    return Output::refuse(
                        refuse_with("this server requires a pre-shared key"),
                        HandshakeError::Mismatch("peer has no key".into()),
                    )
                }
                (true, true) => return Output::refuse(
                    refuse_with("this server runs unauthenticated but the client holds a key; refusing to downgrade"),
                    HandshakeError::Mismatch(
                        "peer holds a key, this side runs unauthenticated".into(),
                    ),
                ),
                _ => {}
            }
        }
        // Checked after the version (a version 2 peer sends no extension). The acceptor
        // refuses a mismatch too (its Refuse follows its Hello); the dialer saying it names
        // both settings.
        let ext = match ext {
            None => {
                let e = WireError::Decode {
                    what: "hello",
                    reason: "no encryption parameters".into(),
                };
                let e = HandshakeError::from(e);
                return if self.p.dialer {
                    Output::fail(e)
                } else {
                    let why = e.to_string();
                    Output::refuse(refuse_with(&why), e)
                };
            }
            Some(ext) if ext.encrypt != self.p.encrypt => {
                let (ours, theirs) = (self.p.encrypt, ext.encrypt);
                let e = HandshakeError::EncryptionMismatch { ours, theirs };
                return if self.p.dialer {
                    Output::fail(e)
                } else {
                    let why = format!("encryption policy mismatch: the server has encrypt = {ours} for this link, the client encrypt = {theirs}");
                    Output::refuse(refuse_with(&why), e)
                };
            }
            Some(ext) => ext,
        };
        let peer = Peer {
            hello: Bytes::copy_from_slice(body),
            msg,
            ext,
        };
        if self.p.dialer {
            self.state = State::Welcome(peer);
            return Output::more(BytesMut::new());
        }
        // The dialer's hinted key if this side holds it, else this side's first.
        let key = pick_key(&self.p.secrets, &peer.msg.hello.nonce, hint.as_ref()).cloned();
        let cipher = match self.keys(&peer, key.as_ref()) {
            Ok(c) => c,
            Err(e) => return Output::fail(e),
        };
        let tag = self.tag(&peer, key.as_ref(), b"S");
        let mut send = self.my_hello.clone();
        send.extend_from_slice(&frame(Kind::Welcome, &wire::encode(&wire::Welcome { tag })));
        self.state = State::Auth { peer, key, cipher };
        Output::more(send)
    }

    /// Dialer: the acceptor's Welcome (or Refuse).
    fn on_welcome(&mut self, peer: Peer, kind: Kind, body: &[u8]) -> Output {
        match kind {
            Kind::Welcome => {}
            Kind::Refuse => {
                return match wire::decode::<wire::Refuse>("refuse", body) {
                    Ok(r) => Output::fail(HandshakeError::Rejected(r.reason)),
                    Err(e) => Output::fail(e),
                }
            }
            other => return Output::fail(HandshakeError::Unexpected(other)),
        }
        let w: wire::Welcome = match wire::decode("welcome", body) {
            Ok(w) => w,
            Err(e) => return Output::fail(e),
        };
        // The acceptor proved one of our keys (the hinted one if it holds it; during a
        // rotation possibly another): that one is the session's.
        let proved = {
            let [c, s] = self.transcript(&peer);
            self.p
                .secrets
                .iter()
                .find(|k| k.verify(&[AUTH_CONTEXT, b"S", c, s], &w.tag))
                .cloned()
        };
        let auth = |hs: &Self, key: Option<&Secret>| {
            frame(
                Kind::Auth,
                &wire::encode(&wire::Auth {
                    tag: hs.tag(&peer, key, b"C"),
                }),
            )
        };
        match (self.p.secrets.is_empty(), &proved) {
            (false, None) => {
                // Wrong key here or an impostor there: our proof tells the acceptor (its
                // Refuse names the reason), and reveals nothing reusable (fresh nonces,
                // role-bound). Nothing else is sent.
                let send = auth(self, self.p.secrets.first());
                self.state = State::Refuse;
                return Output::more(send);
            }
            (true, _) if peer.msg.hello.authenticated => {
                return Output::fail(HandshakeError::Mismatch(
                    "the peer requires a key but none is configured here".into(),
                ))
            }
            _ => {}
        }
        let cipher = match self.keys(&peer, proved.as_ref()) {
            Ok(c) => c,
            Err(e) => return Output::fail(e),
        };
        let auth = auth(self, proved.as_ref());
        Output {
            send: BytesMut::new(),
            next: Self::negotiated(peer, Some(auth), cipher),
        }
    }

    /// Acceptor: the dialer's Auth. Only the Auth is read; frames pipelined behind it stay
    /// unread until it verified.
    fn on_auth(
        &mut self,
        peer: Peer,
        key: Option<Secret>,
        cipher: Option<(Sealer, Opener)>,
        kind: Kind,
        body: &[u8],
    ) -> Output {
        if kind != Kind::Auth {
            return Output::fail(HandshakeError::Unexpected(kind));
        }
        let a: wire::Auth = match wire::decode("auth", body) {
            Ok(a) => a,
            Err(e) => return Output::fail(e),
        };
        if let Some(k) = &key {
            let [c, s] = self.transcript(&peer);
            if !k.verify(&[AUTH_CONTEXT, b"C", c, s], &a.tag) {
                return Output::refuse(
                    refuse("wrong key"),
                    HandshakeError::Rejected("wrong key".into()),
                );
            }
        }
        Output {
            send: BytesMut::new(),
            next: Self::negotiated(peer, None, cipher),
        }
    }
}

/// Splits the first handshake frame off `buf`: `Ok(None)` until it is complete.
pub(crate) fn take_frame(buf: &mut BytesMut) -> Result<Option<(Kind, BytesMut)>, HandshakeError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(head);
    let h = parse_header(&h)?;
    if buf.len() < HEADER_LEN + h.len as usize {
        return Ok(None);
    }
    let _ = buf.split_to(HEADER_LEN);
    Ok(Some((h.kind, buf.split_to(h.len as usize))))
}

/// Fuzzing entry: decodes `body` as the peer's Hello and returns its re-encoding (`None`:
/// refused). Decoding the re-encoding must give the same bytes again.
#[doc(hidden)]
pub fn fuzz_decode_hello(body: &[u8]) -> Option<Bytes> {
    decode_hello(Kind::Hello, body)
        .ok()
        .map(|(m, ext, hint)| encode_hello(&m, ext.as_ref(), hint.as_ref()))
}

/// Fuzzing entry: `data` after its first byte as the byte stream a peer sends before it is
/// authenticated, fed to the handshake core until it finishes or fails, exactly as the
/// session's handshake loop feeds it. The first byte's low two bits pick the role (dialer or
/// acceptor) and whether the link encrypts; the core always holds a rotated key pair. (One
/// role per input rather than all four: each encrypting role makes an X25519 key pair, the
/// bulk of an input's cost.)
#[doc(hidden)]
pub fn fuzz_handshake(data: &[u8]) {
    let Some((&role, data)) = data.split_first() else {
        return;
    };
    let Ok(key) = Key::from_bytes(*b"fuzzing-key-0123456789")
        .and_then(|k| k.accepting_bytes(*b"fuzzing-key-next-456789"))
    else {
        return;
    };
    let (dialer, encrypt) = (role & 1 == 1, role & 2 == 2);
    {
        let eph = if encrypt {
            match Ephemeral::generate() {
                Ok(e) => Some(e),
                Err(_) => return,
            }
        } else {
            None
        };
        let params = Params {
            dialer,
            encrypt,
            secrets: key.secrets(),
            services: vec!["fs".into()],
            stream_window: 1 << 20,
            max_frame: 1 << 20,
        };
        let (mut hs, _) = Handshake::new(params, [7; 32], eph);
        let mut buf = BytesMut::from(data);
        loop {
            let (kind, body) = match take_frame(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let _ = hs.on_read_error(HandshakeError::PeerClosed);
                    break;
                }
                Err(e) => {
                    let _ = hs.on_read_error(e);
                    break;
                }
            };
            let out = hs.on_frame(kind, &body);
            match out.next {
                Next::More => {}
                Next::Done(n) => {
                    // Only a peer holding the key gets here; the fuzzer cannot.
                    assert!(n.auth.is_some() == dialer);
                    break;
                }
                Next::Failed(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(keys: &[u8]) -> Vec<Secret> {
        let Some((first, rest)) = keys.split_first() else {
            return Vec::new();
        };
        let mut k = Key::from_bytes(vec![*first; 32]).unwrap();
        for b in rest {
            k = k.accepting_bytes(vec![*b; 32]).unwrap();
        }
        k.secrets()
    }

    fn side(dialer: bool, keys: &[u8], encrypt: bool, seed: u8) -> (Handshake, BytesMut) {
        let eph = encrypt.then(|| Ephemeral::generate().unwrap());
        Handshake::new(
            Params {
                dialer,
                encrypt,
                secrets: secrets(keys),
                services: vec![if dialer { "fs" } else { "exec" }.into()],
                stream_window: 1000 + u32::from(dialer),
                max_frame: 1 << 20,
            },
            [seed; 32],
            eph,
        )
    }

    /// How one side ended.
    #[allow(clippy::large_enum_variant)]
    enum End {
        Done(Negotiated),
        Failed(HandshakeError),
        /// Still waiting when the other side stopped.
        Waiting,
    }

    impl std::fmt::Debug for End {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                End::Done(_) => f.write_str("Done"),
                End::Failed(e) => write!(f, "Failed({e:?})"),
                End::Waiting => f.write_str("Waiting"),
            }
        }
    }

    /// Runs a dialer and an acceptor against each other over in-memory byte queues until
    /// both stop; a side whose peer stopped without sending sees the link close.
    fn run(mut d: (Handshake, BytesMut), mut a: (Handshake, BytesMut)) -> (End, End) {
        let mut to_a = std::mem::take(&mut d.1);
        let mut to_d = std::mem::take(&mut a.1);
        let (mut d_end, mut a_end) = (None, None);
        let step = |hs: &mut Handshake, inbox: &mut BytesMut, outbox: &mut BytesMut| {
            let (kind, body) = take_frame(inbox).unwrap()?;
            let out = hs.on_frame(kind, &body);
            outbox.extend_from_slice(&out.send);
            match out.next {
                Next::More => None,
                Next::Done(n) => {
                    // The session's writer sends the dialer's Auth ahead of its first frames.
                    if let Some(auth) = &n.auth {
                        outbox.extend_from_slice(auth);
                    }
                    Some(Some(End::Done(n)))
                }
                Next::Failed(e) => Some(Some(End::Failed(e))),
            }
            .or(Some(None))
        };
        for _ in 0..10 {
            if a_end.is_none() {
                if let Some(Some(end)) = step(&mut a.0, &mut to_a, &mut to_d) {
                    a_end = Some(end);
                }
            }
            if d_end.is_none() {
                if let Some(Some(end)) = step(&mut d.0, &mut to_d, &mut to_a) {
                    d_end = Some(end);
                }
            }
            if d_end.is_some() && a_end.is_some() {
                break;
            }
        }
        // A side still waiting whose peer has finished: the link closes under it.
        let closed = |hs: &mut Handshake, end: Option<End>, peer_done: bool| match end {
            Some(e) => e,
            None if peer_done => End::Failed(hs.on_read_error(HandshakeError::PeerClosed)),
            None => End::Waiting,
        };
        let (dd, ad) = (d_end.is_some(), a_end.is_some());
        (closed(&mut d.0, d_end, ad), closed(&mut a.0, a_end, dd))
    }

    /// The two negotiated ends seal and open each other's records.
    fn assert_ciphers_match(d: &mut Negotiated, a: &mut Negotiated) {
        let (ds, dop) = d.cipher.as_mut().expect("dialer keys");
        let (as_, aop) = a.cipher.as_mut().expect("acceptor keys");
        for (seal, open) in [(ds, aop), (as_, dop)] {
            let mut wire = std::collections::VecDeque::new();
            seal.seal_pieces(
                [crate::crypto::Piece::Owned(BytesMut::from(&b"sealed"[..]))],
                &mut wire,
            )
            .unwrap();
            let mut raw = BytesMut::new();
            for c in wire {
                raw.extend_from_slice(&c);
            }
            let rec = open.open_record(&mut raw).unwrap().expect("a record");
            assert_eq!(&rec[..], b"sealed");
        }
    }

    fn done(e: End) -> Negotiated {
        match e {
            End::Done(n) => n,
            other => panic!("expected success, got {other:?}"),
        }
    }

    fn failed(e: End) -> HandshakeError {
        match e {
            End::Failed(e) => e,
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn dialer_and_acceptor_agree() {
        for (keys, encrypt) in [(&[][..], false), (&[1][..], false), (&[1][..], true)] {
            let (d, a) = run(side(true, keys, encrypt, 1), side(false, keys, encrypt, 2));
            let (mut d, mut a) = (done(d), done(a));
            assert_eq!(d.peer_services, vec!["exec".to_string()]);
            assert_eq!(a.peer_services, vec!["fs".to_string()]);
            assert_eq!((d.peer_window, a.peer_window), (1000, 1001));
            assert_eq!(d.peer_max_frame, 1 << 20);
            // The dialer's Auth rides with its first frames; the acceptor has none.
            let auth = d.auth.take().expect("dialer's Auth");
            assert_eq!(auth[4], Kind::Auth as u8);
            assert!(a.auth.is_none());
            if encrypt {
                assert_ciphers_match(&mut d, &mut a);
            } else {
                assert!(d.cipher.is_none() && a.cipher.is_none());
            }
        }
    }

    #[test]
    fn wrong_key_is_refused_by_name_on_both_sides() {
        let (d, a) = run(side(true, &[1], true, 1), side(false, &[2], true, 2));
        assert!(matches!(failed(a), HandshakeError::Rejected(r) if r == "wrong key"));
        assert!(matches!(failed(d), HandshakeError::Rejected(r) if r == "wrong key"));
        // The acceptor vanishing instead of refusing: the dialer knows it was not proved.
        let mut d = side(true, &[1], false, 1);
        let (mut a, _) = side(false, &[2], false, 2);
        let (kind, body) = take_frame(&mut d.1).unwrap().unwrap();
        let mut to_d = a.on_frame(kind, &body).send;
        let mut sent = BytesMut::new();
        while let Some((kind, body)) = take_frame(&mut to_d).unwrap() {
            let out = d.0.on_frame(kind, &body);
            assert!(matches!(out.next, Next::More));
            sent.extend_from_slice(&out.send);
        }
        let (kind, _) = take_frame(&mut sent).unwrap().unwrap();
        assert_eq!(kind, Kind::Auth, "our proof, for its Refuse");
        assert!(matches!(
            d.0.on_read_error(HandshakeError::PeerClosed),
            HandshakeError::PeerNotAuthenticated
        ));
    }

    #[test]
    fn key_presence_must_match() {
        let (d, a) = run(side(true, &[], false, 1), side(false, &[1], false, 2));
        assert!(matches!(failed(a), HandshakeError::Mismatch(_)));
        assert!(
            matches!(failed(d), HandshakeError::Rejected(r) if r.contains("requires a pre-shared key"))
        );
        let (d, a) = run(side(true, &[1], false, 1), side(false, &[], false, 2));
        assert!(matches!(failed(a), HandshakeError::Mismatch(_)));
        assert!(matches!(failed(d), HandshakeError::Rejected(r) if r.contains("downgrade")));
    }

    #[test]
    fn encryption_policy_must_match() {
        let (d, a) = run(side(true, &[1], true, 1), side(false, &[1], false, 2));
        assert!(matches!(
            failed(a),
            HandshakeError::EncryptionMismatch {
                ours: false,
                theirs: true
            }
        ));
        // The dialer names both settings itself, before reading the acceptor's Refuse.
        assert!(matches!(
            failed(d),
            HandshakeError::EncryptionMismatch {
                ours: true,
                theirs: false
            }
        ));
    }

    /// A dialer Hello of another protocol version, as `side` would send it.
    fn hello_with_version(version: u16, with_ext: bool) -> BytesMut {
        let msg = HelloMsg {
            hello: wire::Hello {
                magic: wire::MAGIC,
                version,
                nonce: [3; 32],
                services: vec![],
                authenticated: false,
            },
            stream_window: 1,
            max_frame: 4096,
        };
        let ext = HelloExt {
            encrypt: false,
            dh: [0; PUBLIC_KEY_LEN],
        };
        frame(
            Kind::Hello,
            &encode_hello(&msg, with_ext.then_some(&ext), None),
        )
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        // A version 2 peer sends no extension: still reported as a version mismatch.
        for (v, ext) in [(2, false), (4, true)] {
            let (mut a, _) = side(false, &[], false, 2);
            let mut f = hello_with_version(v, ext);
            let (kind, body) = take_frame(&mut f).unwrap().unwrap();
            let out = a.on_frame(kind, &body);
            assert!(matches!(
                out.next,
                Next::Failed(HandshakeError::Version { ours: wire::VERSION, theirs }) if theirs == v
            ));
            // The dialer gets our Hello and a Refuse saying why.
            let mut send = out.send;
            let (k1, _) = take_frame(&mut send).unwrap().unwrap();
            let (k2, body) = take_frame(&mut send).unwrap().unwrap();
            assert_eq!((k1, k2), (Kind::Hello, Kind::Refuse));
            let r: wire::Refuse = wire::decode("refuse", &body).unwrap();
            assert!(r.reason.contains(&format!("version {v}")), "{}", r.reason);
            // A dialer receiving such a Hello fails the same way.
            let (mut d, _) = side(true, &[], false, 1);
            let out = d.on_frame(kind, &hello_with_version(v, ext)[HEADER_LEN..]);
            assert!(matches!(
                out.next,
                Next::Failed(HandshakeError::Version { theirs, .. }) if theirs == v
            ));
        }
    }

    #[test]
    fn a_replayed_proof_does_not_open_another_handshake() {
        // Record a successful dialer's Hello and Auth...
        let d = side(true, &[1], false, 1);
        let hello = d.1.clone();
        let (dn, an) = run(d, side(false, &[1], false, 2));
        let auth = done(dn).auth.unwrap();
        done(an);
        // ...and replay them to an acceptor with a fresh nonce: its tag covers the new Hello.
        let (mut a, _) = side(false, &[1], false, 9);
        let mut input = hello;
        input.extend_from_slice(&auth);
        let (kind, body) = take_frame(&mut input).unwrap().unwrap();
        assert!(matches!(a.on_frame(kind, &body).next, Next::More));
        let (kind, body) = take_frame(&mut input).unwrap().unwrap();
        let out = a.on_frame(kind, &body);
        assert!(matches!(out.next, Next::Failed(HandshakeError::Rejected(r)) if r == "wrong key"));
        assert_eq!(out.send[4], Kind::Refuse as u8);
    }

    #[test]
    fn rotation_hint_picks_the_key_the_dialer_holds() {
        // The acceptor holds old (1) and new (2); either dialer gets in, with its own key
        // mixed into the record keys (the ciphers interoperate only if both used the same).
        for dialer_key in [1u8, 2] {
            let (d, a) = run(
                side(true, &[dialer_key], true, 1),
                side(false, &[1, 2], true, 2),
            );
            assert_ciphers_match(&mut done(d), &mut done(a));
        }
        // A dialer that moved to the new key first, accepting the old: the acceptor still on
        // the old key alone proves it, and the dialer adopts it.
        let (d, a) = run(side(true, &[2, 1], true, 1), side(false, &[1], true, 2));
        assert_ciphers_match(&mut done(d), &mut done(a));
    }

    #[test]
    fn garbage_and_truncated_input_are_typed_errors() {
        // Not our header at all (an HTTP or SSH server answering).
        let mut http = BytesMut::from(&b"HTTP/1.1 400 Bad Request\r\n"[..]);
        assert!(matches!(
            take_frame(&mut http),
            Err(HandshakeError::NotOffload)
        ));
        // A header announcing more than a handshake frame may hold.
        let mut big = frame(Kind::Hello, &[]);
        big[..4].copy_from_slice(&(MAX_HANDSHAKE_FRAME + 1).to_le_bytes());
        assert!(matches!(
            take_frame(&mut big),
            Err(HandshakeError::NotOffload)
        ));
        // A frame cut short is not complete yet.
        let mut short = frame(Kind::Hello, &[1, 2, 3]);
        short.truncate(HEADER_LEN + 2);
        assert!(take_frame(&mut short).unwrap().is_none());
        // First frame not a Hello, a truncated Hello, a Hello with the wrong magic.
        let good = side(true, &[], false, 1).1;
        let body = &good[HEADER_LEN..];
        let mut bad_magic = body.to_vec();
        bad_magic[0] ^= 1;
        for (kind, body) in [
            (Kind::Welcome, body),
            (Kind::Hello, &body[..10]),
            (Kind::Hello, &bad_magic[..]),
            (Kind::Hello, &[][..]),
        ] {
            for dialer in [true, false] {
                let (mut hs, _) = side(dialer, &[], false, 2);
                assert!(matches!(
                    hs.on_frame(kind, body).next,
                    Next::Failed(HandshakeError::NotOffload)
                ));
            }
        }
        // After a good Hello: an undecodable Welcome, an unexpected kind, a garbled Auth.
        let acc_hello = |dialer_hello: &BytesMut| {
            let (mut a, _) = side(false, &[1], false, 2);
            let out = a.on_frame(Kind::Hello, &dialer_hello[HEADER_LEN..]);
            (a, out.send)
        };
        let (mut d, hello) = side(true, &[1], false, 1);
        let (mut a, mut to_d) = acc_hello(&hello);
        let (kind, body) = take_frame(&mut to_d).unwrap().unwrap();
        assert!(matches!(d.on_frame(kind, &body).next, Next::More));
        assert!(matches!(
            d.on_frame(Kind::Welcome, &[0xff]).next,
            Next::Failed(HandshakeError::Wire(WireError::Decode {
                what: "welcome",
                ..
            }))
        ));
        assert!(matches!(
            a.on_frame(Kind::Auth, &[0xff, 0xff]).next,
            Next::Failed(HandshakeError::Wire(WireError::Decode { what: "auth", .. }))
        ));
        let (mut d, hello) = side(true, &[1], false, 1);
        let (mut a, mut to_d) = acc_hello(&hello);
        let (kind, body) = take_frame(&mut to_d).unwrap().unwrap();
        let _ = d.on_frame(kind, &body);
        assert!(matches!(
            d.on_frame(Kind::Data, &[]).next,
            Next::Failed(HandshakeError::Unexpected(Kind::Data))
        ));
        assert!(matches!(
            a.on_frame(Kind::Request, &[]).next,
            Next::Failed(HandshakeError::Unexpected(Kind::Request))
        ));
        // A finished handshake takes no more frames.
        assert!(matches!(
            a.on_frame(Kind::Auth, &[]).next,
            Next::Failed(HandshakeError::Unexpected(Kind::Auth))
        ));
    }

    #[test]
    fn fuzz_handshake_runs_on_its_edge_cases() {
        let (_, hello) = side(true, &[], false, 1);
        let mut two = hello.clone();
        two.extend_from_slice(&frame(Kind::Welcome, &[0]));
        for data in [&b""[..], &[0u8; 12][..], &hello[..], &two[..]] {
            for role in 0..4u8 {
                fuzz_handshake(&[&[role][..], data].concat());
            }
        }
    }

    #[test]
    fn acceptor_picks_the_hinted_key_else_its_first() {
        let old = Key::from_bytes(vec![1; 32]).unwrap();
        let both = Key::from_bytes(vec![1; 32])
            .unwrap()
            .accepting_bytes(vec![2; 32])
            .unwrap()
            .secrets();
        let new = Key::from_bytes(vec![2; 32]).unwrap().secrets();
        let nonce = [9u8; 32];
        let pick =
            |hint: Option<&HelloHint>| pick_key(&both, &nonce, hint).map(|k| k.bytes().to_vec());
        assert_eq!(pick(None), Some(vec![1; 32]));
        assert_eq!(pick(Some(&key_hint(&new[0], &nonce))), Some(vec![2; 32]));
        assert_eq!(
            pick(Some(&key_hint(&old.secrets()[0], &nonce))),
            Some(vec![1; 32])
        );
        // A hint for another nonce (replayed) or another key falls back to the first key.
        assert_eq!(
            pick(Some(&key_hint(&new[0], &[8u8; 32]))),
            Some(vec![1; 32])
        );
        let other = Key::from_bytes(vec![3; 32]).unwrap().secrets();
        assert_eq!(pick(Some(&key_hint(&other[0], &nonce))), Some(vec![1; 32]));
        assert!(pick_key(&[], &nonce, None).is_none());
    }

    #[test]
    fn hello_round_trips_with_and_without_hint() {
        let msg = HelloMsg {
            hello: wire::Hello {
                magic: wire::MAGIC,
                version: wire::VERSION,
                nonce: [4; 32],
                services: vec!["fs".into()],
                authenticated: true,
            },
            stream_window: 1,
            max_frame: 4096,
        };
        let ext = HelloExt {
            encrypt: true,
            dh: [7; PUBLIC_KEY_LEN],
        };
        let hint = HelloHint {
            key_hint: [5; HINT_LEN],
        };
        let with = encode_hello(&msg, Some(&ext), Some(&hint));
        let (_, e, h) = decode_hello(Kind::Hello, &with).unwrap();
        assert!(e.is_some());
        assert_eq!(h.map(|h| h.key_hint), Some([5; HINT_LEN]));
        // What a peer from before key rotation sends, and what it decodes of ours.
        let without = encode_hello(&msg, Some(&ext), None);
        let (_, e, h) = decode_hello(Kind::Hello, &without).unwrap();
        assert!(e.is_some() && h.is_none());
        assert!(with.starts_with(&without));
        let old_view: HelloExt = postcard::from_bytes(&with[wire::encode(&msg).len()..]).unwrap();
        assert_eq!(old_view.dh, [7; PUBLIC_KEY_LEN]);
    }
}
