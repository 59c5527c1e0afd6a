//! Handshake framing, without I/O.
//!
//! ```text
//! u64 LE  length   = 1 + len(json)
//! u8      type     0 Connection, 1 Metadata, 2 Notify, 3 Probe
//! bytes   json
//! ```
//!
//! A payload whose first byte is above 3 comes from Mooncake's older protocol, which had no
//! type byte; it is read as a Connection message, as Mooncake does. Decoding is two steps, as
//! in mini-redis: [`check`] says whether a whole frame is buffered (without allocating) and
//! [`parse`] builds it.

use std::time::Duration;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// RDMA queue-pair exchange.
    Connection = 0,
    /// P2P segment-descriptor exchange.
    Metadata = 1,
    /// An application notification.
    Notify = 2,
    /// Liveness probe.
    Probe = 3,
}

impl MessageType {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Connection,
            1 => Self::Metadata,
            2 => Self::Notify,
            3 => Self::Probe,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its type.
    pub kind: MessageType,
    /// The JSON body, as sent.
    pub body: Vec<u8>,
}

/// Why a buffer does not hold a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed; not an error of the peer.
    #[error("incomplete frame")]
    Incomplete,
    /// The length field is zero.
    #[error("empty handshake frame")]
    Empty,
    /// The length field exceeds the limit.
    #[error("handshake frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
}

const LENGTH_BYTES: usize = 8;

/// A listener wants a request's length and type within this long of the connection.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(1);
/// And its body at this rate at least, in bytes per second.
pub const MIN_RATE: u64 = 64 << 10;

/// How long after the connection a listener waits for the whole frame that `buf` starts:
/// [`HEADER_DEADLINE`] until the length is in, then as long again plus the time the body
/// takes at [`MIN_RATE`].
pub fn deadline(buf: &[u8]) -> Duration {
    let Some(header) = buf.get(..LENGTH_BYTES) else {
        return HEADER_DEADLINE;
    };
    let len = u64::from_le_bytes(header.try_into().expect("slice of 8 bytes"));
    let body_ms = len.saturating_mul(1000) / MIN_RATE;
    HEADER_DEADLINE.saturating_add(Duration::from_millis(body_ms))
}

/// Encodes a frame.
pub fn encode(kind: MessageType, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LENGTH_BYTES + 1 + body.len());
    out.extend_from_slice(&(1 + body.len() as u64).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(body);
    out
}

/// The total size of the frame at the start of `buf`, once all of it is buffered.
pub fn check(buf: &[u8], max: usize) -> Result<usize, FrameError> {
    let Some(header) = buf.get(..LENGTH_BYTES) else {
        return Err(FrameError::Incomplete);
    };
    let len = u64::from_le_bytes(header.try_into().expect("slice of 8 bytes"));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    // A limit near usize::MAX must not let the total overflow.
    let total = usize::try_from(len)
        .ok()
        .filter(|_| len <= max as u64)
        .and_then(|len| len.checked_add(LENGTH_BYTES))
        .ok_or(FrameError::TooLarge { len, max })?;
    if buf.len() < total {
        return Err(FrameError::Incomplete);
    }
    Ok(total)
}

/// Builds the frame whose size [`check`] returned.
pub fn parse(buf: &[u8], total: usize) -> Frame {
    let payload = &buf[LENGTH_BYTES..total];
    match MessageType::from_byte(payload[0]) {
        Some(kind) => Frame {
            kind,
            body: payload[1..].to_vec(),
        },
        None => Frame {
            kind: MessageType::Connection,
            body: payload.to_vec(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode(MessageType::Notify, br#"{"name":"a","notify_msg":"b"}"#);
        assert_eq!(&bytes[..8], &(30u64).to_le_bytes());
        let total = check(&bytes, 1 << 20).unwrap();
        assert_eq!(total, bytes.len());
        let frame = parse(&bytes, total);
        assert_eq!(frame.kind, MessageType::Notify);
        assert_eq!(frame.body, br#"{"name":"a","notify_msg":"b"}"#);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let bytes = encode(MessageType::Probe, b"{}");
        for cut in 0..bytes.len() {
            assert_eq!(check(&bytes[..cut], 1 << 20), Err(FrameError::Incomplete));
        }
    }

    #[test]
    fn a_frame_gets_time_for_its_size_only() {
        assert_eq!(deadline(&[]), HEADER_DEADLINE);
        assert_eq!(deadline(&[1, 2, 3]), HEADER_DEADLINE);
        let small = encode(MessageType::Probe, b"{}");
        assert!(deadline(&small) < HEADER_DEADLINE + Duration::from_millis(10));
        let big = (MIN_RATE * 10).to_le_bytes();
        assert_eq!(deadline(&big), HEADER_DEADLINE + Duration::from_secs(10));
        assert!(deadline(&u64::MAX.to_le_bytes()) > Duration::from_secs(1 << 30));
    }

    #[test]
    fn limits_and_old_protocol() {
        assert_eq!(check(&0u64.to_le_bytes(), 64), Err(FrameError::Empty));
        assert_eq!(
            check(&u64::MAX.to_le_bytes(), 64),
            Err(FrameError::TooLarge {
                len: u64::MAX,
                max: 64
            })
        );
        let mut old = 2u64.to_le_bytes().to_vec();
        old.extend_from_slice(b"{}");
        let frame = parse(&old, check(&old, 64).unwrap());
        assert_eq!(frame.kind, MessageType::Connection);
        assert_eq!(frame.body, b"{}");
    }

    #[test]
    fn a_length_near_the_top_of_an_unlimited_frame_is_too_large() {
        let len = usize::MAX as u64 - 7;
        assert_eq!(
            check(&len.to_le_bytes(), usize::MAX),
            Err(FrameError::TooLarge {
                len,
                max: usize::MAX
            })
        );
        assert_eq!(
            check(&u64::MAX.to_le_bytes(), usize::MAX),
            Err(FrameError::TooLarge {
                len: u64::MAX,
                max: usize::MAX
            })
        );
    }
}

/// Property tests of the codec. They run proptest's default case count under `cargo test`;
/// set `PROPTEST_CASES=100000` for a longer run.
#[cfg(test)]
mod fuzz {
    use mooncake_common::service::opening;
    use proptest::prelude::*;

    use super::*;

    fn kind() -> impl Strategy<Value = MessageType> {
        prop_oneof![
            Just(MessageType::Connection),
            Just(MessageType::Metadata),
            Just(MessageType::Notify),
            Just(MessageType::Probe),
        ]
    }

    /// Lengths near the edges as often as anywhere else.
    fn length() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..64,
            any::<u64>(),
            u64::MAX - 16..=u64::MAX,
            (usize::MAX as u64).saturating_sub(16)..=usize::MAX as u64,
        ]
    }

    fn limit() -> impl Strategy<Value = usize> {
        prop_oneof![0usize..128, any::<usize>(), usize::MAX - 16..=usize::MAX]
    }

    /// A buffer that starts with `length`, then arbitrary bytes.
    fn buffer() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..96),
            (length(), proptest::collection::vec(any::<u8>(), 0..96)).prop_map(|(len, rest)| {
                let mut buf = len.to_le_bytes().to_vec();
                buf.extend(rest);
                buf
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::default())]

        #[test]
        fn check_and_parse_never_panic(buf in buffer(), max in limit()) {
            match check(&buf, max) {
                Ok(total) => {
                    prop_assert!(total <= buf.len());
                    let len = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    prop_assert!(len >= 1 && len <= max as u64);
                    prop_assert_eq!(total as u64, 8 + len);
                    let frame = parse(&buf, total);
                    let payload = &buf[8..total];
                    if payload[0] <= 3 {
                        prop_assert_eq!(frame.kind as u8, payload[0]);
                        prop_assert_eq!(&frame.body[..], &payload[1..]);
                    } else {
                        prop_assert_eq!(frame.kind, MessageType::Connection);
                        prop_assert_eq!(&frame.body[..], payload);
                    }
                }
                Err(FrameError::Incomplete) => {}
                Err(FrameError::Empty) => prop_assert_eq!(&buf[..8], &[0u8; 8]),
                Err(FrameError::TooLarge { len, max: limit }) => {
                    prop_assert_eq!(limit, max);
                    prop_assert!(len > max as u64 || (len as usize).checked_add(8).is_none());
                }
            }
            let _ = deadline(&buf);
        }

        #[test]
        fn round_trip(kind in kind(), body in proptest::collection::vec(any::<u8>(), 0..512),
                      slack in 0usize..4, trailing in proptest::collection::vec(any::<u8>(), 0..16)) {
            let bytes = encode(kind, &body);
            prop_assert_eq!(bytes.len(), 9 + body.len());
            let max = body.len() + 1 + slack;
            // Bytes of the next frame behind this one change nothing.
            let mut buffered = bytes.clone();
            buffered.extend(&trailing);
            let total = check(&buffered, max);
            prop_assert_eq!(total.clone(), Ok(bytes.len()));
            prop_assert_eq!(parse(&buffered, bytes.len()), Frame { kind, body: body.clone() });
            for cut in 0..bytes.len() {
                prop_assert_eq!(check(&bytes[..cut], max), Err(FrameError::Incomplete));
            }
            prop_assert_eq!(
                check(&bytes, body.len()),
                Err(FrameError::TooLarge { len: body.len() as u64 + 1, max: body.len() })
            );
        }

        /// The length alone decides: a frame over the limit is refused from its first eight
        /// bytes, before anything sized by it exists.
        #[test]
        fn too_large_from_the_header_alone(len in length(), under in prop_oneof![Just(0u64), any::<u64>()]) {
            let len = len.max(1);
            let max = (len - 1 - under % len) as usize;
            prop_assert_eq!(check(&len.to_le_bytes(), max), Err(FrameError::TooLarge { len, max }));
        }

        #[test]
        fn deadline_grows_with_the_announced_length(a in length(), b in length()) {
            let (short, long) = (a.min(b), a.max(b));
            let (short, long) = (deadline(&short.to_le_bytes()), deadline(&long.to_le_bytes()));
            prop_assert!(HEADER_DEADLINE <= short && short <= long);
        }

        /// A cluster-token opening is never taken for a handshake frame under any limit a
        /// listener could use.
        #[test]
        fn an_opening_is_never_a_frame(step in prop_oneof![
            Just(opening::Step::Hello), Just(opening::Step::Challenge), Just(opening::Step::Answer)
        ], fill in any::<u8>(), max in 0usize..=1 << 40) {
            let frame = opening::encode(step, &vec![fill; step.body_len()]);
            let checked = check(&frame, max);
            prop_assert!(matches!(checked, Err(FrameError::TooLarge { .. })), "{:?}", checked);
        }
    }
}
