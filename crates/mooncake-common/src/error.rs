//! One error type from the core to JavaScript.
//!
//! [`ErrorKind`] is `Copy` and maps to a stable `ERR_*` string (what JavaScript branches on)
//! and, where Mooncake defines one, its negative numeric code. [`Error`] adds a message and
//! an optional source; it is cheap to clone because a failed slice shares its error with every
//! task and batch that reports it.

use std::fmt;
use std::sync::Arc;

/// What went wrong, as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input from the caller: zero length, empty name or key, malformed option, impossible
    /// replica count.
    InvalidArgument,
    /// More requests than the batch can hold.
    TooManyRequests,
    /// A local or remote range is not inside one registered buffer.
    AddressNotRegistered,
    /// A batch was freed while some of its tasks are unfinished.
    BatchBusy,
    /// No usable device for the requested transport or location.
    DeviceNotFound,
    /// A registration overlaps an existing one.
    AddressOverlapped,
    /// The target cannot be reached with the requested transport.
    NotSupportedTransport,
    /// A peer's host name did not resolve.
    Dns,
    /// Connect, bind, read or write failed, or a peer hung up.
    Socket,
    /// Unparsable JSON from a peer, the metadata store or a file.
    MalformedJson,
    /// A peer refused the handshake.
    RejectHandshake,
    /// The metadata store failed or lacks an entry.
    Metadata,
    /// An RDMA endpoint could not be created or connected.
    Endpoint,
    /// An RDMA context, device or registration failed.
    Context,
    /// Out of memory, or a mapping failed.
    Memory,
    /// The operation exists in Mooncake but not in this build.
    NotImplemented,
    /// A transfer did not finish before its deadline.
    Timeout,
    /// The engine was closed while the operation was pending.
    Closed,
    /// A registered buffer is in use by a pending transfer.
    BufferBusy,
    /// A peer sent a frame that breaks the protocol.
    Protocol,
    /// Moving bytes failed: a transfer the peer did not explain, or every replica of an object.
    TransferFailed,
    /// Every rail (local NIC, peer NIC pair) to the target is down or out of retries.
    NoRail,
    /// Store: no segment has room for the object.
    NoAvailableHandle,
    /// Store: the key does not exist.
    ObjectNotFound,
    /// Store: the key already exists (or is being written).
    ObjectAlreadyExists,
    /// Store: the object is leased by a reader.
    ObjectHasLease,
    /// Store: a read finished after its lease ran out.
    LeaseExpired,
    /// Store: the object has no complete replica yet.
    ReplicaIsNotReady,
    /// Store: the operation comes from a client that did not start the write.
    IllegalClient,
    /// Store: no write is in progress for the key.
    InvalidWrite,
    /// Store: the segment is not mounted.
    SegmentNotFound,
    /// Store: a replica is in use by a master-side task.
    ObjectReplicaBusy,
    /// Store: the master could not be reached.
    RpcFail,
    /// Store: the master did not answer in time.
    RpcTimeout,
    /// Store: client and master versions differ.
    InvalidVersion,
    /// Store: the operation is not possible in the current state.
    UnavailableInCurrentStatus,
    /// Store: the buffer is too small for the object.
    BufferOverflow,
    /// Store: an internal invariant broke.
    InternalError,
    /// The peer did not prove it holds the cluster token (or the proof was stale or replayed).
    Unauthenticated,
    /// Authenticated, but the operation needs a role or ownership the caller lacks.
    PermissionDenied,
    /// P2P store: this node already serves a payload of that name.
    PayloadOpened,
    /// P2P store: this node does not serve a payload of that name.
    PayloadNotOpened,
    /// P2P store: no payload of that name is in the catalogue.
    PayloadNotFound,
    /// P2P store: a shard failed on every source, as many times as allowed.
    TooManyRetries,
    /// Bytes read do not match the checksum their writer recorded.
    ChecksumMismatch,
}

impl ErrorKind {
    /// Every kind, for catalogues and tests.
    pub const ALL: &'static [ErrorKind] = &[
        Self::InvalidArgument,
        Self::TooManyRequests,
        Self::AddressNotRegistered,
        Self::BatchBusy,
        Self::DeviceNotFound,
        Self::AddressOverlapped,
        Self::NotSupportedTransport,
        Self::Dns,
        Self::Socket,
        Self::MalformedJson,
        Self::RejectHandshake,
        Self::Metadata,
        Self::Endpoint,
        Self::Context,
        Self::Memory,
        Self::NotImplemented,
        Self::Timeout,
        Self::Closed,
        Self::BufferBusy,
        Self::Protocol,
        Self::TransferFailed,
        Self::NoRail,
        Self::NoAvailableHandle,
        Self::ObjectNotFound,
        Self::ObjectAlreadyExists,
        Self::ObjectHasLease,
        Self::LeaseExpired,
        Self::ReplicaIsNotReady,
        Self::IllegalClient,
        Self::InvalidWrite,
        Self::SegmentNotFound,
        Self::ObjectReplicaBusy,
        Self::RpcFail,
        Self::RpcTimeout,
        Self::InvalidVersion,
        Self::UnavailableInCurrentStatus,
        Self::BufferOverflow,
        Self::InternalError,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::PayloadOpened,
        Self::PayloadNotOpened,
        Self::PayloadNotFound,
        Self::TooManyRetries,
        Self::ChecksumMismatch,
    ];

    /// The stable string code JavaScript sees as `error.code`.
    pub const fn code(self) -> &'static str {
        match self {
            Self::InvalidArgument => "ERR_INVALID_ARGUMENT",
            Self::TooManyRequests => "ERR_TOO_MANY_REQUESTS",
            Self::AddressNotRegistered => "ERR_ADDRESS_NOT_REGISTERED",
            Self::BatchBusy => "ERR_BATCH_BUSY",
            Self::DeviceNotFound => "ERR_DEVICE_NOT_FOUND",
            Self::AddressOverlapped => "ERR_ADDRESS_OVERLAPPED",
            Self::NotSupportedTransport => "ERR_NOT_SUPPORTED_TRANSPORT",
            Self::Dns => "ERR_DNS",
            Self::Socket => "ERR_SOCKET",
            Self::MalformedJson => "ERR_MALFORMED_JSON",
            Self::RejectHandshake => "ERR_REJECT_HANDSHAKE",
            Self::Metadata => "ERR_METADATA",
            Self::Endpoint => "ERR_ENDPOINT",
            Self::Context => "ERR_CONTEXT",
            Self::Memory => "ERR_MEMORY",
            Self::NotImplemented => "ERR_NOT_IMPLEMENTED",
            Self::Timeout => "ERR_TIMEOUT",
            Self::Closed => "ERR_CLOSED",
            Self::BufferBusy => "ERR_BUFFER_BUSY",
            Self::Protocol => "ERR_PROTOCOL",
            Self::TransferFailed => "ERR_TRANSFER_FAILED",
            Self::NoRail => "ERR_NO_RAIL",
            Self::NoAvailableHandle => "ERR_NO_AVAILABLE_HANDLE",
            Self::ObjectNotFound => "ERR_OBJECT_NOT_FOUND",
            Self::ObjectAlreadyExists => "ERR_OBJECT_ALREADY_EXISTS",
            Self::ObjectHasLease => "ERR_OBJECT_HAS_LEASE",
            Self::LeaseExpired => "ERR_LEASE_EXPIRED",
            Self::ReplicaIsNotReady => "ERR_REPLICA_IS_NOT_READY",
            Self::IllegalClient => "ERR_ILLEGAL_CLIENT",
            Self::InvalidWrite => "ERR_INVALID_WRITE",
            Self::SegmentNotFound => "ERR_SEGMENT_NOT_FOUND",
            Self::ObjectReplicaBusy => "ERR_OBJECT_REPLICA_BUSY",
            Self::RpcFail => "ERR_RPC_FAIL",
            Self::RpcTimeout => "ERR_RPC_TIMEOUT",
            Self::InvalidVersion => "ERR_INVALID_VERSION",
            Self::UnavailableInCurrentStatus => "ERR_UNAVAILABLE_IN_CURRENT_STATUS",
            Self::BufferOverflow => "ERR_BUFFER_OVERFLOW",
            Self::InternalError => "ERR_INTERNAL_ERROR",
            Self::Unauthenticated => "ERR_UNAUTHENTICATED",
            Self::PermissionDenied => "ERR_PERMISSION_DENIED",
            Self::PayloadOpened => "ERR_PAYLOAD_OPENED",
            Self::PayloadNotOpened => "ERR_PAYLOAD_NOT_OPENED",
            Self::PayloadNotFound => "ERR_PAYLOAD_NOT_FOUND",
            Self::TooManyRetries => "ERR_TOO_MANY_RETRIES",
            Self::ChecksumMismatch => "ERR_CHECKSUM_MISMATCH",
        }
    }

    /// Mooncake's numeric code, where one exists: the Transfer Engine's `ERR_*` values
    /// (`include/error.h`) and the Store's `ErrorCode` values (`types.h`). Where the two name
    /// different errors with one number (-1, -101, -200), the Store's keeps it, so that every
    /// number names one kind; the string code is the identity either way.
    pub const fn errno(self) -> Option<i32> {
        Some(match self {
            Self::TooManyRequests => -2,
            Self::AddressNotRegistered => -3,
            Self::BatchBusy => -4,
            Self::DeviceNotFound => -6,
            Self::AddressOverlapped => -7,
            Self::NotSupportedTransport => -8,
            Self::Socket => -102,
            Self::MalformedJson => -103,
            Self::RejectHandshake => -104,
            Self::Endpoint => -201,
            Self::Context => -202,
            Self::Memory => -302,
            Self::NotImplemented => -303,
            Self::InternalError => -1,
            Self::BufferOverflow => -10,
            Self::SegmentNotFound => -101,
            Self::NoAvailableHandle => -200,
            Self::InvalidVersion => -300,
            Self::InvalidArgument => -600,
            Self::IllegalClient => -601,
            Self::InvalidWrite => -700,
            Self::ReplicaIsNotReady => -703,
            Self::ObjectNotFound => -704,
            Self::ObjectAlreadyExists => -705,
            Self::ObjectHasLease => -706,
            Self::LeaseExpired => -707,
            Self::ObjectReplicaBusy => -714,
            Self::TransferFailed => -800,
            Self::RpcFail => -900,
            Self::RpcTimeout => -901,
            Self::UnavailableInCurrentStatus => -1010,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An error with a stable kind, a message and an optional cause.
#[derive(Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the cause chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by every cause, one per line, as `Caused by: ...`.
    pub fn report(&self) -> String {
        let mut out = self.message.clone();
        let mut next = std::error::Error::source(self);
        while let Some(cause) = next {
            out.push_str("\nCaused by: ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::Socket`] with an I/O cause.
    pub fn socket(context: impl fmt::Display, source: std::io::Error) -> Self {
        Self::new(ErrorKind::Socket, format!("{context}: {source}")).with_source(source)
    }

    /// Shorthand for [`ErrorKind::Closed`].
    pub fn closed(what: &str) -> Self {
        Self::new(ErrorKind::Closed, format!("{what} is closed"))
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.report())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_numbers_are_unique() {
        let mut codes = std::collections::HashSet::new();
        let mut numbers = std::collections::HashSet::new();
        for kind in ErrorKind::ALL {
            assert!(kind.code().starts_with("ERR_"));
            assert!(codes.insert(kind.code()), "duplicate code {}", kind.code());
            if let Some(errno) = kind.errno() {
                assert!(numbers.insert(errno), "{errno} names two kinds");
            }
        }
    }

    #[test]
    fn report_walks_the_cause_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::socket("connect 127.0.0.1:1", io);
        assert_eq!(err.kind(), ErrorKind::Socket);
        assert!(err.report().contains("Caused by: refused"));
        assert_eq!(ErrorKind::AddressNotRegistered.errno(), Some(-3));
    }
}
