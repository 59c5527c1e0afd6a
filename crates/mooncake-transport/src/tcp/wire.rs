//! TCP data-protocol framing, without I/O.
//!
//! ```text
//! request header (24 bytes, little-endian)
//!   0  u64 size     payload length
//!   8  u64 addr     absolute address in the server's memory
//!   16 u8  opcode   0 READ, 1 WRITE; | 0x80 marks protocol v2
//!   17 7 bytes      padding
//! v2 status frame: u64 = 0x4D435456_00000000 | code   (0 OK, 1 address rejected)
//! ```
//!
//! v2 WRITE: header, payload, then the server answers a status once the bytes are applied.
//! v2 READ: header; the server answers a status, then the payload. v1 has no status frames and
//! a rejected address just closes the connection.
//!
//! A session serves its requests in order. Our client relies on that to acknowledge v1 writes:
//! it follows each v1 WRITE with a one-byte v1 READ of the write's last byte on the same
//! connection, and reports the write only when that byte arrives (Mooncake's v1 client reports
//! it when the last byte leaves the socket, before the peer has applied anything).

/// Size of the request header.
pub const HEADER_LEN: usize = 24;
/// Size of a status frame.
pub const STATUS_LEN: usize = 8;

const V2_FLAG: u8 = 0x80;
const STATUS_MAGIC: u64 = 0x4D43_5456_0000_0000;

/// Protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// No status frames.
    V1,
    /// Status frames acknowledge writes and admit reads.
    V2,
}

/// Request direction, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The server sends its memory.
    Read,
    /// The server receives into its memory.
    Write,
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length.
    pub size: u64,
    /// Address in the server's memory.
    pub addr: u64,
    /// Direction.
    pub op: Op,
    /// Protocol version.
    pub version: Version,
}

/// A header that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown TCP data opcode {0:#04x}")]
pub struct BadOpcode(pub u8);

impl Header {
    /// Encodes; the padding is zeroed.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..16].copy_from_slice(&self.addr.to_le_bytes());
        let op = match self.op {
            Op::Read => 0,
            Op::Write => 1,
        };
        out[16] = match self.version {
            Version::V1 => op,
            Version::V2 => op | V2_FLAG,
        };
        out
    }

    /// Decodes; the padding is ignored (Mooncake leaves it uninitialised).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, BadOpcode> {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let opcode = bytes[16];
        let version = if opcode & V2_FLAG != 0 {
            Version::V2
        } else {
            Version::V1
        };
        let op = match opcode & !V2_FLAG {
            0 => Op::Read,
            1 => Op::Write,
            _ => return Err(BadOpcode(opcode)),
        };
        Ok(Self {
            size: word(0),
            addr: word(8),
            op,
            version,
        })
    }
}

/// A v2 status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Accepted (reads) or applied (writes).
    Ok,
    /// The range is not inside one registered buffer.
    AddressRejected,
    /// A code this side does not know.
    Other(u32),
}

impl Status {
    /// Encodes a status frame.
    pub fn encode(self) -> [u8; STATUS_LEN] {
        let code = match self {
            Self::Ok => 0,
            Self::AddressRejected => 1,
            Self::Other(code) => code,
        };
        (STATUS_MAGIC | u64::from(code)).to_le_bytes()
    }

    /// Decodes a status frame; `None` when the magic is wrong.
    pub fn decode(bytes: &[u8; STATUS_LEN]) -> Option<Self> {
        let word = u64::from_le_bytes(*bytes);
        if word & 0xFFFF_FFFF_0000_0000 != STATUS_MAGIC {
            return None;
        }
        Some(match word as u32 {
            0 => Self::Ok,
            1 => Self::AddressRejected,
            code => Self::Other(code),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_example() {
        // v2 WRITE of 100 000 bytes to 0x7f00_0000_1000.
        let header = Header {
            size: 100_000,
            addr: 0x7f00_0000_1000,
            op: Op::Write,
            version: Version::V2,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..8], &[0xa0, 0x86, 0x01, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[8..16], &[0x00, 0x10, 0, 0, 0, 0x7f, 0, 0]);
        assert_eq!(bytes[16], 0x81);
        assert_eq!(Header::decode(&bytes).unwrap(), header);
        assert_eq!(Status::Ok.encode(), [0, 0, 0, 0, 0x56, 0x54, 0x43, 0x4d]);
        assert_eq!(
            Status::decode(&Status::AddressRejected.encode()),
            Some(Status::AddressRejected)
        );
        assert_eq!(Status::decode(&[0; 8]), None);
    }

    #[test]
    fn v1_and_garbage_opcodes() {
        let mut bytes = [0xffu8; HEADER_LEN];
        bytes[16] = 0;
        assert_eq!(Header::decode(&bytes).unwrap().version, Version::V1);
        bytes[16] = 0x42;
        assert_eq!(Header::decode(&bytes), Err(BadOpcode(0x42)));
    }
}

/// Property tests of the framing. They run proptest's default case count under `cargo test`;
/// set `PROPTEST_CASES=100000` for a longer run.
#[cfg(test)]
mod fuzz {
    use mooncake_common::service::opening;
    use proptest::prelude::*;

    use super::*;

    fn header() -> impl Strategy<Value = Header> {
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![Just(Op::Read), Just(Op::Write)],
            prop_oneof![Just(Version::V1), Just(Version::V2)],
        )
            .prop_map(|(size, addr, op, version)| Header {
                size,
                addr,
                op,
                version,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::default())]

        #[test]
        fn decode_reads_any_bytes_and_knows_only_mooncake_opcodes(
            mut bytes in any::<[u8; HEADER_LEN]>(),
            opcode in prop_oneof![any::<u8>(), prop::sample::select(vec![0u8, 1, 0x80, 0x81])],
        ) {
            bytes[16] = opcode;
            let known = [0u8, 1, 0x80, 0x81].contains(&bytes[16]);
            match Header::decode(&bytes) {
                Ok(header) => {
                    prop_assert!(known);
                    prop_assert_eq!(header.size, u64::from_le_bytes(bytes[..8].try_into().unwrap()));
                    prop_assert_eq!(header.addr, u64::from_le_bytes(bytes[8..16].try_into().unwrap()));
                    // Re-encoding keeps every meaningful byte and zeroes the padding.
                    let again = header.encode();
                    prop_assert_eq!(&again[..17], &bytes[..17]);
                    prop_assert_eq!(&again[17..], &[0u8; 7]);
                }
                Err(BadOpcode(opcode)) => {
                    prop_assert!(!known);
                    prop_assert_eq!(opcode, bytes[16]);
                }
            }
        }

        #[test]
        fn headers_round_trip_whatever_the_padding(header in header(), padding in any::<[u8; 7]>()) {
            let mut bytes = header.encode();
            prop_assert_eq!(Header::decode(&bytes), Ok(header));
            bytes[17..].copy_from_slice(&padding);
            prop_assert_eq!(Header::decode(&bytes), Ok(header));
        }

        #[test]
        fn status_frames_need_the_magic(
            word in prop_oneof![any::<u64>(), any::<u32>().prop_map(|c| STATUS_MAGIC | u64::from(c))],
            code in any::<u32>(),
        ) {
            let bytes = word.to_le_bytes();
            match Status::decode(&bytes) {
                Some(status) => {
                    prop_assert_eq!(word >> 32, STATUS_MAGIC >> 32);
                    prop_assert_eq!(status.encode(), bytes);
                }
                None => prop_assert_ne!(word >> 32, STATUS_MAGIC >> 32),
            }
            let status = match code {
                0 => Status::Ok,
                1 => Status::AddressRejected,
                code => Status::Other(code),
            };
            prop_assert_eq!(Status::decode(&status.encode()), Some(status));
        }

        #[test]
        fn an_opening_is_never_a_request(fill in any::<u8>()) {
            for step in [opening::Step::Hello, opening::Step::Challenge, opening::Step::Answer] {
                let frame = opening::encode(step, &vec![fill; step.body_len()]);
                let header: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
                prop_assert_eq!(Header::decode(&header), Err(BadOpcode(frame[16])));
            }
        }
    }
}
