//! What an incoming frame means, decided without I/O: the session's reader hands each decoded
//! frame to [`Rules`] and gets back an [`Event`] (a call to run, a reply to deliver, stream
//! data, credit, a ping to answer...) or the [`Violation`] that ends the session; the
//! per-stream and per-call decisions (duplicate opens, unknown ids, data after EOF, credit
//! overrun, admission limits, replies too big for the peer) are functions of plain state.
//! The tokio driver in [`crate::session`] owns the tables, channels and tasks and only executes
//! what these say (quinn-proto's split), so every rule here is unit-tested without a socket.

use bytes::Bytes;

use crate::rules::WindowExceeded;
use crate::service::RemoteError;
use crate::session::{CallError, CloseReason};
use crate::stream::StreamState;
use crate::wire::{self, ErrorBody, Header, Kind, WireError};

/// Error codes the session itself puts in Error frames (services use their own, ≥ 0).
pub(crate) const CODE_UNKNOWN_SERVICE: i32 = -1;
/// The peer's limit of calls in flight is reached.
pub(crate) const CODE_BUSY: i32 = -2;

/// A frame rule the peer broke; it ends the session as [`CloseReason::Protocol`] (with this
/// text, unchanged from before the rules were split out).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Violation {
    /// A header or control message did not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A Credit frame whose payload is not exactly a u32.
    #[error("credit frame of {0} bytes")]
    CreditLength(usize),
    /// An Open with an id of this side's parity.
    #[error("stream id {0} has the wrong parity")]
    WrongParity(u32),
    /// An Open for a stream id still in use.
    #[error("stream id {0} reused")]
    StreamReused(u32),
    /// Data after the peer's own EOF on that stream.
    #[error("data after EOF on stream {0}")]
    DataAfterEof(u32),
    /// More data than the window the peer was given.
    #[error("stream {id} {source}")]
    Overrun {
        /// The stream.
        id: u32,
        /// The window it exceeded.
        source: WindowExceeded,
    },
    /// The acceptor refused the dialer's Auth after the dialer had started the session.
    #[error("the peer refused the session: {0}")]
    Refused(String),
    /// A handshake frame on an established session.
    #[error("{0:?} frame after the handshake")]
    HandshakeFrame(Kind),
}

impl From<Violation> for CloseReason {
    fn from(v: Violation) -> CloseReason {
        CloseReason::Protocol(v.to_string())
    }
}

/// A call's answer as it arrived, decoded only once its call is found (an answer to a call
/// the caller gave up is dropped unread).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A Response: the reply bytes.
    Response(Bytes),
    /// An Error frame: its undecoded [`ErrorBody`].
    Error(Bytes),
}

impl Answer {
    /// The call's outcome; an Error body that does not decode is a violation.
    pub(crate) fn outcome(self) -> Result<Result<Bytes, CallError>, Violation> {
        match self {
            Answer::Response(b) => Ok(Ok(b)),
            Answer::Error(b) => {
                let e: ErrorBody = wire::decode("error", &b)?;
                Ok(Err(match e.code {
                    CODE_UNKNOWN_SERVICE => CallError::UnknownService(e.message),
                    CODE_BUSY => CallError::Busy,
                    code => CallError::Remote(RemoteError {
                        code,
                        message: e.message,
                    }),
                }))
            }
        }
    }
}

/// What one incoming frame asks of the driver.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// Run a call to `service` (see [`Rules::admit_call`]) and answer call `id`.
    Request {
        /// The peer's call id, echoed in the answer.
        id: u32,
        /// The service called.
        service: String,
        /// The request bytes.
        body: Bytes,
    },
    /// Deliver the answer of our call `id` (if it is still awaited).
    Answer {
        /// Our call id.
        id: u32,
        /// What came back.
        answer: Answer,
    },
    /// The peer opens stream `id` (see [`Rules::on_open`]).
    Open {
        /// The new stream id (of the peer's parity).
        id: u32,
        /// The service the stream is for.
        service: String,
        /// What the stream is for, as the service defines it.
        header: Bytes,
    },
    /// Stream bytes (see [`on_data`]).
    Data {
        /// The stream.
        id: u32,
        /// The bytes.
        payload: Bytes,
    },
    /// The peer writes no more on stream `id` (see [`on_eof`]).
    Eof {
        /// The stream.
        id: u32,
    },
    /// The peer aborts stream `id`.
    Reset {
        /// The stream.
        id: u32,
        /// The peer's reason.
        reason: String,
    },
    /// The peer consumed `n` bytes of stream `id`: grant that much more send credit.
    Grant {
        /// The stream.
        id: u32,
        /// Bytes of credit returned.
        n: u32,
    },
    /// Answer with a Pong of the same sequence number.
    SendPong(u32),
    /// The answer to our Ping `seq` (for round-trip metrics).
    Pong(u32),
    /// The peer opens nothing new; what is in flight finishes.
    GoAway,
}

/// Whether an incoming call runs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Run it.
    Run,
    /// Answer at once with this Error instead.
    Refuse {
        /// One of the session's codes ([`CODE_UNKNOWN_SERVICE`], [`CODE_BUSY`]).
        code: i32,
        /// The detail sent along.
        message: String,
    },
}

/// Whether a stream the peer opens is accepted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// Register it and hand it to its service.
    Accept,
    /// Reset it at once, with this reason.
    Refuse(String),
}

/// What to do with arriving stream bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Hand them to the stream's reader (counted against its window).
    Deliver,
    /// Nobody reads them (the reader left, the stream was reset): credit them back at once.
    Discard,
    /// No such stream here (already reset or dropped; the peer learns from the Reset): ignore.
    Unknown,
}

/// The frame rules of one established session.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// This side dialed: the peer opens even stream ids.
    pub dialer: bool,
    /// Most streams open at once.
    pub max_streams: usize,
    /// Most incoming calls being handled at once.
    pub max_inflight_calls: usize,
    /// Largest reply the peer accepts (its frame limit and ours).
    pub max_reply: usize,
}

impl Rules {
    /// Decodes one frame of an established session into what it asks for.
    pub(crate) fn decode(&self, h: Header, payload: Bytes) -> Result<Event, Violation> {
        let id = h.id;
        Ok(match h.kind {
            Kind::Request => {
                let (service, body) = wire::split_service(payload)?;
                Event::Request { id, service, body }
            }
            Kind::Response => Event::Answer {
                id,
                answer: Answer::Response(payload),
            },
            Kind::Error => Event::Answer {
                id,
                answer: Answer::Error(payload),
            },
            Kind::Open => {
                // The peer opens odd ids if it dialed, even ids if it accepted.
                let peer_parity = if self.dialer { 0 } else { 1 };
                if id % 2 != peer_parity {
                    return Err(Violation::WrongParity(id));
                }
                let (service, header) = wire::split_service(payload)?;
                Event::Open {
                    id,
                    service,
                    header,
                }
            }
            Kind::Data => Event::Data { id, payload },
            Kind::Eof => Event::Eof { id },
            Kind::Reset => Event::Reset {
                id,
                reason: String::from_utf8_lossy(&payload).into_owned(),
            },
            Kind::Credit => Event::Grant {
                id,
                n: u32_payload(&payload)?,
            },
            Kind::Ping => Event::SendPong(id),
            Kind::Pong => Event::Pong(id),
            Kind::GoAway => Event::GoAway,
            // The acceptor refuses a dialer's Auth after the dialer already started the
            // session (it only does so on a wrong key, which the dialer normally detects first).
            Kind::Refuse if self.dialer => {
                let why = wire::decode::<wire::Refuse>("refuse", &payload)
                    .map(|r| r.reason)
                    .unwrap_or_else(|e| e.to_string());
                return Err(Violation::Refused(why));
            }
            Kind::Hello | Kind::Auth | Kind::Welcome | Kind::Refuse => {
                return Err(Violation::HandshakeFrame(h.kind))
            }
        })
    }

    /// Whether an incoming call runs: its service must exist and fewer than
    /// `max_inflight_calls` calls may be running (`running` of them are, this one excluded).
    pub(crate) fn admit_call(&self, service: &str, known: bool, running: usize) -> Admission {
        if !known {
            Admission::Refuse {
                code: CODE_UNKNOWN_SERVICE,
                message: service.to_string(),
            }
        } else if running >= self.max_inflight_calls {
            Admission::Refuse {
                code: CODE_BUSY,
                message: "busy".into(),
            }
        } else {
            Admission::Run
        }
    }

    /// Whether the peer may open stream `id` for `service`: an id in use is a violation; an
    /// unknown service or a full table refuses the stream alone.
    pub(crate) fn on_open(
        &self,
        id: u32,
        in_use: bool,
        service: &str,
        known: bool,
        open_streams: usize,
    ) -> Result<Opening, Violation> {
        if in_use {
            return Err(Violation::StreamReused(id));
        }
        Ok(if !known {
            Opening::Refuse(format!("no service {service:?}"))
        } else if open_streams >= self.max_streams {
            Opening::Refuse("too many streams".into())
        } else {
            Opening::Accept
        })
    }

    /// The answer to a call: its reply, or an EMSGSIZE error when the reply would exceed the
    /// peer's frame limit (the peer would close the session on it). Returns the frame kind
    /// and its payload.
    pub(crate) fn answer(&self, res: Result<Bytes, RemoteError>) -> (Kind, Bytes) {
        match res {
            Ok(b) if b.len() > self.max_reply => error_payload(
                libc::EMSGSIZE,
                format!(
                    "reply of {} bytes exceeds the frame limit {}",
                    b.len(),
                    self.max_reply
                ),
            ),
            Ok(b) => (Kind::Response, b),
            Err(e) => error_payload(e.code, e.message),
        }
    }
}

/// An Error frame's kind and payload.
pub(crate) fn error_payload(code: i32, message: String) -> (Kind, Bytes) {
    (Kind::Error, wire::encode(&ErrorBody { code, message }))
}

/// `n` bytes of Data arrived for a stream in state `st` (`None`: no such stream here).
pub(crate) fn on_data(
    id: u32,
    st: Option<&mut StreamState>,
    n: u64,
) -> Result<Delivery, Violation> {
    let Some(st) = st else {
        return Ok(Delivery::Unknown);
    };
    if st.remote_fin {
        return Err(Violation::DataAfterEof(id));
    }
    if st.reader_gone || st.reset.is_some() {
        return Ok(Delivery::Discard);
    }
    st.recv
        .on_data(n)
        .map_err(|source| Violation::Overrun { id, source })?;
    Ok(Delivery::Deliver)
}

/// The peer's EOF on a stream in state `st`; returns whether the stream is finished on both
/// sides here and leaves the table.
pub(crate) fn on_eof(st: &mut StreamState) -> bool {
    st.remote_fin = true;
    st.reader_gone && st.writer_gone
}

/// A Credit frame's payload: exactly one little-endian u32.
pub(crate) fn u32_payload(p: &[u8]) -> Result<u32, Violation> {
    let arr: [u8; 4] = p.try_into().map_err(|_| Violation::CreditLength(p.len()))?;
    Ok(u32::from_le_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RecvWindow;
    use bytes::BytesMut;
    use std::collections::HashMap;

    fn rules(dialer: bool) -> Rules {
        Rules {
            dialer,
            max_streams: 2,
            max_inflight_calls: 3,
            max_reply: 100,
        }
    }

    fn frame(kind: Kind, id: u32, payload: &[u8]) -> (Header, Bytes) {
        (
            Header {
                len: payload.len() as u32,
                kind,
                id,
            },
            Bytes::copy_from_slice(payload),
        )
    }

    fn with_service(service: &str, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        wire::put_service_prefix(service, &mut b);
        b.extend_from_slice(body);
        b.to_vec()
    }

    fn decode(r: &Rules, kind: Kind, id: u32, payload: &[u8]) -> Result<Event, Violation> {
        let (h, p) = frame(kind, id, payload);
        r.decode(h, p)
    }

    #[test]
    fn every_frame_kind_decodes_to_its_event() {
        let r = rules(true);
        assert_eq!(
            decode(&r, Kind::Request, 7, &with_service("fs", b"req")),
            Ok(Event::Request {
                id: 7,
                service: "fs".into(),
                body: Bytes::from_static(b"req")
            })
        );
        assert_eq!(
            decode(&r, Kind::Response, 7, b"rep"),
            Ok(Event::Answer {
                id: 7,
                answer: Answer::Response(Bytes::from_static(b"rep"))
            })
        );
        let err = wire::encode(&ErrorBody {
            code: 2,
            message: "ENOENT".into(),
        });
        assert_eq!(
            decode(&r, Kind::Error, 8, &err),
            Ok(Event::Answer {
                id: 8,
                answer: Answer::Error(err.clone())
            })
        );
        // The dialer's peer opens even ids.
        assert_eq!(
            decode(&r, Kind::Open, 4, &with_service("bridge", b"hdr")),
            Ok(Event::Open {
                id: 4,
                service: "bridge".into(),
                header: Bytes::from_static(b"hdr")
            })
        );
        assert_eq!(
            decode(&r, Kind::Data, 4, b"xyz"),
            Ok(Event::Data {
                id: 4,
                payload: Bytes::from_static(b"xyz")
            })
        );
        assert_eq!(decode(&r, Kind::Eof, 4, b""), Ok(Event::Eof { id: 4 }));
        assert_eq!(
            decode(&r, Kind::Reset, 4, b"gone \xff"),
            Ok(Event::Reset {
                id: 4,
                reason: "gone \u{fffd}".into()
            })
        );
        assert_eq!(
            decode(&r, Kind::Credit, 4, &70_000u32.to_le_bytes()),
            Ok(Event::Grant { id: 4, n: 70_000 })
        );
        assert_eq!(decode(&r, Kind::Ping, 9, b""), Ok(Event::SendPong(9)));
        assert_eq!(decode(&r, Kind::Pong, 9, b""), Ok(Event::Pong(9)));
        assert_eq!(decode(&r, Kind::GoAway, 0, b""), Ok(Event::GoAway));
    }

    #[test]
    fn answers_map_the_session_codes_to_typed_errors() {
        let body = |code, message: &str| {
            Answer::Error(wire::encode(&ErrorBody {
                code,
                message: message.into(),
            }))
        };
        assert_eq!(
            Answer::Response(Bytes::from_static(b"ok")).outcome(),
            Ok(Ok(Bytes::from_static(b"ok")))
        );
        assert_eq!(
            body(CODE_UNKNOWN_SERVICE, "nope").outcome(),
            Ok(Err(CallError::UnknownService("nope".into())))
        );
        assert_eq!(body(CODE_BUSY, "busy").outcome(), Ok(Err(CallError::Busy)));
        assert_eq!(
            body(libc::ENOENT, "no such file").outcome(),
            Ok(Err(CallError::Remote(RemoteError {
                code: libc::ENOENT,
                message: "no such file".into()
            })))
        );
        let garbage = Answer::Error(Bytes::from_static(&[0xff; 3])).outcome();
        assert!(matches!(
            garbage,
            Err(Violation::Wire(WireError::Decode { what: "error", .. }))
        ));
    }

    #[test]
    fn malformed_frames_are_typed_violations() {
        let r = rules(false);
        // Service prefixes: empty, truncated, not UTF-8.
        for bad in [&[][..], &[5, b'a'][..], &[2, 0xff, 0xfe][..]] {
            assert!(matches!(
                decode(&r, Kind::Request, 1, bad),
                Err(Violation::Wire(WireError::Decode {
                    what: "service name",
                    ..
                }))
            ));
            assert!(matches!(
                decode(&r, Kind::Open, 1, bad),
                Err(Violation::Wire(_))
            ));
        }
        for len in [0, 3, 5, 8] {
            assert_eq!(
                decode(&r, Kind::Credit, 2, &vec![1; len]),
                Err(Violation::CreditLength(len))
            );
        }
        // The acceptor's peer opens odd ids only; the check comes before the body's.
        assert_eq!(
            decode(&r, Kind::Open, 2, b""),
            Err(Violation::WrongParity(2))
        );
        assert_eq!(
            decode(&rules(true), Kind::Open, 3, &with_service("x", b"")),
            Err(Violation::WrongParity(3))
        );
        // Handshake frames after the handshake; a late Refuse names its reason to the dialer.
        for kind in [Kind::Hello, Kind::Auth, Kind::Welcome, Kind::Refuse] {
            assert_eq!(
                decode(&r, kind, 0, b""),
                Err(Violation::HandshakeFrame(kind))
            );
        }
        let refuse = wire::encode(&wire::Refuse {
            reason: "wrong key".into(),
        });
        let v = decode(&rules(true), Kind::Refuse, 0, &refuse).unwrap_err();
        assert_eq!(v, Violation::Refused("wrong key".into()));
        assert_eq!(
            CloseReason::from(v),
            CloseReason::Protocol("the peer refused the session: wrong key".into())
        );
        assert!(matches!(
            decode(&rules(true), Kind::Refuse, 0, &[0xff; 2]),
            Err(Violation::Refused(_))
        ));
        // The texts the session reports stay what they were.
        assert_eq!(
            CloseReason::from(Violation::Overrun {
                id: 3,
                source: WindowExceeded { window: 10 }
            }),
            CloseReason::Protocol("stream 3 exceeded its window of 10 bytes".into())
        );
        assert_eq!(
            CloseReason::from(Violation::HandshakeFrame(Kind::Hello)),
            CloseReason::Protocol("Hello frame after the handshake".into())
        );
    }

    #[test]
    fn calls_are_admitted_up_to_the_limit_and_known_services_only() {
        let r = rules(true);
        assert_eq!(r.admit_call("fs", true, 0), Admission::Run);
        assert_eq!(r.admit_call("fs", true, 2), Admission::Run);
        assert_eq!(
            r.admit_call("fs", true, 3),
            Admission::Refuse {
                code: CODE_BUSY,
                message: "busy".into()
            }
        );
        assert_eq!(
            r.admit_call("nope", false, 0),
            Admission::Refuse {
                code: CODE_UNKNOWN_SERVICE,
                message: "nope".into()
            }
        );
        // The refusals arrive at the caller as the typed errors.
        for adm in [r.admit_call("nope", false, 0), r.admit_call("fs", true, 9)] {
            let Admission::Refuse { code, message } = adm else {
                panic!("refused")
            };
            let (kind, body) = error_payload(code, message);
            assert_eq!(kind, Kind::Error);
            let out = Answer::Error(body).outcome().unwrap().unwrap_err();
            assert!(matches!(
                out,
                CallError::UnknownService(_) | CallError::Busy
            ));
        }
    }

    #[test]
    fn replies_too_big_for_the_peer_become_emsgsize() {
        let r = rules(true);
        let fits = Bytes::from(vec![1; 100]);
        assert_eq!(r.answer(Ok(fits.clone())), (Kind::Response, fits));
        let (kind, body) = r.answer(Ok(Bytes::from(vec![1; 101])));
        assert_eq!(kind, Kind::Error);
        let e: ErrorBody = wire::decode("error", &body).unwrap();
        assert_eq!(e.code, libc::EMSGSIZE);
        assert_eq!(e.message, "reply of 101 bytes exceeds the frame limit 100");
        let (kind, body) = r.answer(Err(RemoteError {
            code: 5,
            message: "EIO".into(),
        }));
        assert_eq!(kind, Kind::Error);
        assert_eq!(
            Answer::Error(body).outcome(),
            Ok(Err(CallError::Remote(RemoteError {
                code: 5,
                message: "EIO".into()
            })))
        );
    }

    /// The driver's stream table in miniature: the rules applied to a sequence of frames, as
    /// the session's reader applies them, with the reader's consumption in between.
    #[derive(Default)]
    struct Table {
        streams: HashMap<u32, StreamState>,
        delivered: HashMap<u32, u64>,
        credited: Vec<(u32, u64)>,
        refused: Vec<(u32, String)>,
    }

    impl Table {
        fn feed(
            &mut self,
            r: &Rules,
            kind: Kind,
            id: u32,
            payload: &[u8],
        ) -> Result<(), Violation> {
            match decode(r, kind, id, payload)? {
                Event::Open { id, service, .. } => {
                    let known = service == "svc";
                    match r.on_open(
                        id,
                        self.streams.contains_key(&id),
                        &service,
                        known,
                        self.streams.len(),
                    )? {
                        Opening::Accept => {
                            self.streams.insert(
                                id,
                                StreamState {
                                    recv: RecvWindow::new(100),
                                    ..Default::default()
                                },
                            );
                        }
                        Opening::Refuse(why) => self.refused.push((id, why)),
                    }
                }
                Event::Data { id, payload } => {
                    let n = payload.len() as u64;
                    match on_data(id, self.streams.get_mut(&id), n)? {
                        Delivery::Deliver => *self.delivered.entry(id).or_default() += n,
                        Delivery::Discard => self.credited.push((id, n)),
                        Delivery::Unknown => {}
                    }
                }
                Event::Eof { id } => {
                    if let Some(st) = self.streams.get_mut(&id) {
                        if on_eof(st) {
                            self.streams.remove(&id);
                        }
                    }
                }
                Event::Reset { id, .. } => {
                    self.streams.remove(&id);
                }
                other => panic!("unexpected {other:?}"),
            }
            Ok(())
        }
    }

    #[test]
    fn stream_lifecycle_unknown_ids_duplicates_and_overrun() {
        let r = rules(false);
        let mut t = Table::default();
        let open = with_service("svc", b"");
        // Data for a stream never opened (or already gone): ignored, not an error.
        t.feed(&r, Kind::Data, 1, b"early").unwrap();
        t.feed(&r, Kind::Eof, 1, b"").unwrap();
        assert!(t.delivered.is_empty() && t.streams.is_empty());
        t.feed(&r, Kind::Open, 1, &open).unwrap();
        // A second open of a live id ends the session.
        assert_eq!(
            t.feed(&r, Kind::Open, 1, &open),
            Err(Violation::StreamReused(1))
        );
        // Unknown service, then the table limit: those streams alone are refused.
        t.feed(&r, Kind::Open, 3, &with_service("other", b""))
            .unwrap();
        t.feed(&r, Kind::Open, 5, &open).unwrap();
        t.feed(&r, Kind::Open, 7, &open).unwrap();
        assert_eq!(
            t.refused,
            vec![
                (3, "no service \"other\"".to_string()),
                (7, "too many streams".to_string())
            ]
        );
        // Up to the window is delivered; one byte more is an overrun.
        t.feed(&r, Kind::Data, 1, &[0; 60]).unwrap();
        t.feed(&r, Kind::Data, 1, &[0; 40]).unwrap();
        assert_eq!(t.delivered[&1], 100);
        assert_eq!(
            t.feed(&r, Kind::Data, 1, &[0; 1]),
            Err(Violation::Overrun {
                id: 1,
                source: WindowExceeded { window: 100 }
            })
        );
        // Consumption reopens the window.
        let st = t.streams.get_mut(&1).unwrap();
        assert_eq!(st.recv.on_consumed(100), Some(100));
        t.feed(&r, Kind::Data, 1, &[0; 100]).unwrap();
        // A reader that left: bytes are credited straight back, even past the window.
        t.streams.get_mut(&5).unwrap().reader_gone = true;
        t.feed(&r, Kind::Data, 5, &[0; 80]).unwrap();
        t.feed(&r, Kind::Data, 5, &[0; 80]).unwrap();
        assert_eq!(t.credited, vec![(5, 80), (5, 80)]);
        // EOF, then data on the same stream is a violation.
        t.feed(&r, Kind::Eof, 1, b"").unwrap();
        assert_eq!(
            t.feed(&r, Kind::Data, 1, b"late"),
            Err(Violation::DataAfterEof(1))
        );
        // A stream done on both sides leaves the table at the peer's EOF, and its id is free.
        {
            let st = t.streams.get_mut(&5).unwrap();
            st.writer_gone = true;
        }
        t.feed(&r, Kind::Eof, 5, b"").unwrap();
        assert!(!t.streams.contains_key(&5));
        t.feed(&r, Kind::Open, 5, &open).unwrap();
        // A reset stream's id is free again too; its late data is ignored.
        t.feed(&r, Kind::Reset, 5, b"bye").unwrap();
        t.feed(&r, Kind::Data, 5, b"late").unwrap();
        t.feed(&r, Kind::Open, 5, &open).unwrap();
        // Data on a stream reset here (still in the table) is discarded and credited.
        t.streams.get_mut(&5).unwrap().reset = Some("local".into());
        t.feed(&r, Kind::Data, 5, b"abc").unwrap();
        assert_eq!(t.credited.last(), Some(&(5, 3)));
    }
}
