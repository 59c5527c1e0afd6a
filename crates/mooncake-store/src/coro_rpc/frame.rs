//! coro_rpc framing: a 20-byte request header and a 16-byte response header, little-endian,
//! each followed by a body (and an attachment, which the master's RPCs never use).

/// First byte of every header.
pub const MAGIC: u8 = 21;

/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 20;

/// Bytes of a response header.
pub const RESPONSE_HEADER_LEN: usize = 16;

/// The largest body or attachment either side accepts: a 300-key batch of long keys is tens of
/// KiB; anything near this is not a master call.
pub const MAX_BODY_LEN: u32 = 64 << 20;

/// coro_rpc's own error codes (the response header's `err_code`); Mooncake's errors travel
/// inside the body instead.
pub mod errc {
    /// The arguments did not decode as the function's parameters.
    pub const INVALID_RPC_ARGUMENTS: u8 = 4;
    /// No function has this id.
    pub const FUNCTION_NOT_REGISTERED: u8 = 11;
    /// The reply would be too large to send.
    pub const MESSAGE_TOO_LARGE: u8 = 14;
}

/// Why a header was refused; the connection cannot go on after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not coro_rpc, or another version of it.
    #[error("not a coro_rpc header (magic {magic}, version {version}, serialization {serialize})")]
    NotCoroRpc {
        /// The first byte.
        magic: u8,
        /// The header version.
        version: u8,
        /// The serialization type.
        serialize: u8,
    },
    /// A body or attachment beyond [`MAX_BODY_LEN`].
    #[error("a frame of {0} bytes is more than the {MAX_BODY_LEN} allowed")]
    TooLarge(u64),
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Per connection, from 0; the reply carries it back.
    pub seq: u32,
    /// Which function (MD5-32 of its qualified name).
    pub function_id: u32,
    /// Body bytes.
    pub length: u32,
    /// Attachment bytes after the body.
    pub attach_length: u32,
}

impl RequestHeader {
    /// Reads a request header.
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, FrameError> {
        let (magic, version, serialize) = (bytes[0], bytes[1], bytes[2]);
        if magic != MAGIC || version != 0 || serialize != 0 {
            return Err(FrameError::NotCoroRpc {
                magic,
                version,
                serialize,
            });
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let header = Self {
            seq: word(4),
            function_id: word(8),
            length: word(12),
            attach_length: word(16),
        };
        let total = u64::from(header.length) + u64::from(header.attach_length);
        if total > u64::from(MAX_BODY_LEN) {
            return Err(FrameError::TooLarge(total));
        }
        Ok(header)
    }

    /// The header followed by `body`, which callers keep within [`MAX_BODY_LEN`].
    pub fn frame(seq: u32, function_id: u32, body: &[u8]) -> Vec<u8> {
        debug_assert!(body.len() <= MAX_BODY_LEN as usize);
        let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + body.len());
        out.extend_from_slice(&[MAGIC, 0, 0, 0]);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&function_id.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// A response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// 0, or a coro_rpc error code (the body is then its message).
    pub err_code: u8,
    /// The request's.
    pub seq: u32,
    /// Body bytes.
    pub length: u32,
    /// Attachment bytes after the body.
    pub attach_length: u32,
}

impl ResponseHeader {
    /// Reads a response header. Mooncake's client checks neither magic nor version here; this
    /// side does, so a reply from something that is not a master is caught at once.
    pub fn parse(bytes: &[u8; RESPONSE_HEADER_LEN]) -> Result<Self, FrameError> {
        let (magic, version) = (bytes[0], bytes[1]);
        if magic != MAGIC || version != 0 {
            return Err(FrameError::NotCoroRpc {
                magic,
                version,
                serialize: 0,
            });
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let header = Self {
            err_code: bytes[2],
            seq: word(4),
            length: word(8),
            attach_length: word(12),
        };
        let total = u64::from(header.length) + u64::from(header.attach_length);
        if total > u64::from(MAX_BODY_LEN) {
            return Err(FrameError::TooLarge(total));
        }
        Ok(header)
    }

    /// The header followed by `body`, which callers keep within [`MAX_BODY_LEN`].
    pub fn frame(err_code: u8, seq: u32, body: &[u8]) -> Vec<u8> {
        debug_assert!(body.len() <= MAX_BODY_LEN as usize);
        let mut out = Vec::with_capacity(RESPONSE_HEADER_LEN + body.len());
        out.extend_from_slice(&[MAGIC, 0, err_code, 0]);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ready_request_as_captured() {
        let frame = RequestHeader::frame(0, 0x7b81_bb56, &[]);
        assert_eq!(
            frame,
            [0x15, 0, 0, 0, 0, 0, 0, 0, 0x56, 0xbb, 0x81, 0x7b, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let header = RequestHeader::parse(frame[..].try_into().unwrap()).unwrap();
        assert_eq!(header.function_id, 0x7b81_bb56);
    }

    #[test]
    fn other_protocols_and_huge_frames_are_refused() {
        let mut frame = RequestHeader::frame(0, 1, &[]);
        frame[1] = 1;
        assert!(RequestHeader::parse(frame[..20].try_into().unwrap()).is_err());
        let mut frame = RequestHeader::frame(0, 1, &[]);
        frame[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            RequestHeader::parse(frame[..20].try_into().unwrap()),
            Err(FrameError::TooLarge(u64::from(u32::MAX)))
        );
    }
}
