//! The narrow verbs interface the transport is written against.
//!
//! Only what Mooncake's RDMA path uses: open a device, read its port and GID table, a
//! protection domain, memory registration, one completion queue and reliable-connected queue
//! pairs that post one-sided READ and WRITE. Everything is object-safe so a transport holds
//! `Arc<dyn ...>` and the provider (software fabric, libibverbs) is chosen at run time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::{Error, Result};

/// Opens devices by name.
pub trait Provider: Send + Sync {
    /// Names of the devices this provider can open.
    fn device_names(&self) -> Vec<String>;
    /// Opens the device called `name`.
    fn open(&self, name: &str) -> Result<Arc<dyn Device>>;
}

/// An open device (`ibv_context`).
pub trait Device: Send + Sync {
    /// The device name (`mlx5_0`).
    fn name(&self) -> &str;
    /// State of port `port` (1-based).
    fn query_port(&self, port: u8) -> Result<PortAttr>;
    /// The GID table of port `port`; null entries may be left out.
    fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>>;
    /// A protection domain.
    fn alloc_pd(&self) -> Result<Arc<dyn ProtectionDomain>>;
    /// A completion queue with room for `cqe` entries.
    fn create_cq(&self, cqe: usize) -> Result<Arc<dyn CompletionQueue>>;
    /// The next asynchronous event, waiting at most `timeout` for one.
    fn next_event(&self, timeout: Duration) -> Option<AsyncEvent>;
}

/// A protection domain: registrations and queue pairs live in one.
pub trait ProtectionDomain: Send + Sync {
    /// Registers `[addr, addr + len)`; the registration ends when the returned region drops.
    ///
    /// # Safety
    /// The range must stay valid for reads and writes (by the device, on behalf of this
    /// process and of remote peers) until the returned region is dropped.
    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<Arc<dyn MemoryRegion>>;
    /// A reliable-connected queue pair in RESET whose sends complete on `cq`.
    fn create_qp(&self, cq: &Arc<dyn CompletionQueue>, cap: QpCap) -> Result<Arc<dyn QueuePair>>;
}

/// A registration (`ibv_mr`); deregistered on drop.
pub trait MemoryRegion: Send + Sync {
    /// Key for local scatter entries.
    fn lkey(&self) -> u32;
    /// Key peers use to reach the range.
    fn rkey(&self) -> u32;
}

/// A completion queue.
pub trait CompletionQueue: Send + Sync {
    /// Takes up to `max` completions.
    fn poll(&self, max: usize) -> Vec<Completion>;
    /// Waits at most `timeout` for a completion to be ready (it may return early).
    fn wait(&self, timeout: Duration);
    /// The provider's own type, so its queue pairs can find their queue.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A reliable-connected queue pair.
pub trait QueuePair: Send + Sync {
    /// The QP number peers connect to.
    fn qp_num(&self) -> u32;
    /// Moves the QP to another state.
    fn modify(&self, to: QpTransition) -> Result<()>;
    /// Posts signalled work requests, in order. On failure, the first `posted` were accepted
    /// and will complete; the rest were not.
    fn post_send(&self, wrs: &[WorkRequest]) -> Result<(), PostError>;
}

/// Access rights of a registration (a subset of `ibv_access_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access(u32);

impl Access {
    /// The device may write the range on behalf of local work requests.
    pub const LOCAL_WRITE: Access = Access(1);
    /// Peers may write the range.
    pub const REMOTE_WRITE: Access = Access(1 << 1);
    /// Peers may read the range.
    pub const REMOTE_READ: Access = Access(1 << 2);

    /// The raw bits, as libibverbs numbers them.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// Logical port state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Link down.
    Down,
    /// Link up, not yet configured.
    Init,
    /// Armed.
    Armed,
    /// Usable.
    Active,
}

/// What the transport needs of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortAttr {
    /// Logical state.
    pub state: PortState,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU in bytes (256 ... 4096).
    pub active_mtu: u32,
}

/// The kind of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// InfiniBand.
    Ib,
    /// RoCE v1 (Ethernet, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable).
    RoceV2,
}

/// One GID table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    /// Index in the table (what `sgid_index` names).
    pub index: u32,
    /// The raw GID.
    pub gid: [u8; 16],
    /// Its kind.
    pub kind: GidType,
    /// The network device the entry belongs to, if any.
    pub netdev: Option<String>,
}

/// A work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// Outcome.
    pub status: WcStatus,
    /// Bytes moved (meaningful on success).
    pub bytes: u32,
}

/// Completion status (`ibv_wc_status`, the ones that matter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// Done.
    Success,
    /// Local length error.
    LocalLenErr,
    /// Local QP operation error.
    LocalQpOpErr,
    /// Local protection error (bad lkey or range).
    LocalProtErr,
    /// Local access error.
    LocalAccessErr,
    /// Memory window bind error.
    MwBindErr,
    /// Flushed: the QP went to ERR before the request ran.
    FlushErr,
    /// Remote access error (bad rkey, range or rights).
    RemoteAccessErr,
    /// Remote invalid request.
    RemoteInvReqErr,
    /// Remote operation error.
    RemoteOpErr,
    /// Transport retries exceeded (peer unreachable).
    RetryExcErr,
    /// Receiver-not-ready retries exceeded.
    RnrRetryExcErr,
    /// Anything else.
    GeneralErr,
}

impl WcStatus {
    /// Whether the fault is on this side (Mooncake's local class, handed to another NIC).
    pub fn is_local(self) -> bool {
        matches!(
            self,
            Self::LocalLenErr
                | Self::LocalQpOpErr
                | Self::LocalProtErr
                | Self::LocalAccessErr
                | Self::MwBindErr
        )
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Direction of a one-sided operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrOp {
    /// Remote to local.
    Read,
    /// Local to remote.
    Write,
}

/// One signalled one-sided work request with a single scatter entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkRequest {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Direction.
    pub op: WrOp,
    /// Local address.
    pub local_addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Key of the local registration.
    pub lkey: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// Key of the remote registration.
    pub rkey: u32,
}

/// A post that was accepted only in part.
#[derive(Debug, Clone)]
pub struct PostError {
    /// How many leading requests were accepted.
    pub posted: usize,
    /// Why the rest were not.
    pub error: Error,
}

/// Capacities of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCap {
    /// Outstanding send requests.
    pub max_send_wr: u32,
    /// Outstanding receive requests.
    pub max_recv_wr: u32,
    /// Scatter entries per request.
    pub max_sge: u32,
    /// Inline data bytes.
    pub max_inline: u32,
}

/// Where to send a QP next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QpTransition {
    /// RESET to INIT on `port`, with remote read and write allowed.
    Init {
        /// Port number (1-based).
        port: u8,
        /// P_Key index.
        pkey_index: u16,
    },
    /// INIT to ready-to-receive, connected to one peer QP.
    Rtr(RtrAttr),
    /// RTR to ready-to-send.
    Rts,
    /// Any state to ERR: pending and later requests flush.
    Err,
}

/// What RTR needs to know about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtrAttr {
    /// Local port.
    pub port: u8,
    /// Path MTU in bytes.
    pub mtu: u32,
    /// The peer QP.
    pub dest_qp_num: u32,
    /// The peer's GID.
    pub dest_gid: [u8; 16],
    /// The peer's LID.
    pub dest_lid: u16,
    /// Index of the local GID to send from.
    pub sgid_index: u32,
}

/// An asynchronous device event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    /// A port came up.
    PortActive(u8),
    /// A port went down.
    PortError(u8),
    /// The device is unusable.
    DeviceFatal,
    /// A completion queue overflowed or broke; its completions are lost.
    CqError,
    /// A work queue broke.
    WqFatal,
    /// The LID of a port changed.
    LidChange(u8),
    /// A QP broke.
    QpFatal(u32),
    /// The GID table changed.
    GidChange(u8),
}

/// Formats a GID as Mooncake publishes it: 16 lowercase hex bytes joined by `:`.
pub fn gid_to_string(gid: &[u8; 16]) -> String {
    let mut out = String::with_capacity(47);
    for (i, b) in gid.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Parses Mooncake's GID text.
pub fn parse_gid(text: &str) -> Option<[u8; 16]> {
    let mut gid = [0u8; 16];
    let mut parts = text.split(':');
    for byte in gid.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_text_round_trips() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12] = 10;
        gid[15] = 0x0b;
        let text = gid_to_string(&gid);
        assert_eq!(text, "00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:0b");
        assert_eq!(parse_gid(&text), Some(gid));
        assert_eq!(parse_gid("00:01"), None);
        assert_eq!(parse_gid(&format!("{text}:00")), None);
        assert_eq!(parse_gid(&text.replace("ff", "zz")), None);
    }
}
