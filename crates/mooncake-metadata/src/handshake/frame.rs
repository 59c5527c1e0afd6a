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
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    let total = LENGTH_BYTES + len as usize;
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
}
