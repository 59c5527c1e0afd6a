//! An endpoint: the queue pairs between one local device and one peer NIC path, and the
//! connection state machine around them (appendix B of the reference).
//!
//! ```text
//! UNCONNECTED --active or passive setup--> CONNECTING
//! CONNECTING --QPs RTS, peer supports the ack--> CONNECTED_WAIT_READY_ACK --ack--> CONNECTED
//! CONNECTING --peer without ack support--> CONNECTED
//! CONNECTING --failure, never connected--> UNCONNECTED (QPs rebuilt on the next attempt)
//! any, once connected --error / evict / delete--> DESTROYING --drained or timeout--> DESTROYED
//! ```
//!
//! The active side runs [`Endpoint::begin_active`], sends the request, hands the reply to
//! [`Endpoint::complete_active`], sends the ready-ack and calls [`Endpoint::mark_connected`].
//! The passive side answers with [`Endpoint::accept`] and finishes on
//! [`Endpoint::on_ready_ack`]. Both sides may run at once (simultaneous open): they pair the
//! same two sets of QPs, so whichever connects the QPs first wins and the other reuses them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::handshake::messages::ConnectionMessage;

use crate::piece::Piece;
use crate::verbs::{
    gid_to_string, CompletionQueue, ProtectionDomain, QpCap, QpTransition, QueuePair, RtrAttr,
};

/// Connection state of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// QPs exist, not connected.
    Unconnected,
    /// A handshake is in progress.
    Connecting,
    /// QPs are connected; waiting for the active peer's ready-ack.
    ConnectedWaitReadyAck,
    /// Usable.
    Connected,
    /// Retired: QPs in ERR, waiting for outstanding requests to drain.
    Destroying,
    /// Gone.
    Destroyed,
}

/// What the local device contributes to a handshake.
#[derive(Debug, Clone)]
pub(crate) struct LinkInfo {
    pub(crate) gid: [u8; 16],
    pub(crate) gid_index: u32,
    pub(crate) lid: u16,
    pub(crate) port: u8,
    pub(crate) mtu: u32,
}

/// Why a passive request could not use the endpoint as it is.
#[derive(Debug)]
pub(crate) enum AcceptError {
    /// The endpoint is being destroyed; make a new one.
    Retired,
    /// Known peer, new QP numbers: the peer restarted. Retire and rebuild.
    PeerRestarted,
    /// Reject the request.
    Failed(Error),
}

/// How the active side should proceed.
#[derive(Debug)]
pub(crate) enum ActiveStart {
    /// Send this request.
    Send(ConnectionMessage),
    /// Already connected.
    Connected,
    /// A passive handshake connected the QPs; wait for the ready-ack.
    WaitForAck,
    /// Retired meanwhile.
    Retired,
}

pub(crate) struct EndpointInner {
    pub(crate) state: EndpointState,
    pub(crate) qps: Vec<Arc<dyn QueuePair>>,
    /// Outstanding requests per QP.
    pub(crate) depth: Vec<u32>,
    pub(crate) peer_qpns: Option<Vec<u32>>,
    /// The QPs were modified towards some peer; a failed attempt rebuilds them.
    dirty: bool,
    has_connected: bool,
    /// A connect task owns `pending`.
    pub(crate) connecting: bool,
    /// Pieces waiting for the connection.
    pub(crate) pending: Vec<Piece>,
    /// Pieces waiting for room in a send queue.
    pub(crate) backlog: VecDeque<Piece>,
    pub(crate) since: Instant,
    pub(crate) next_qp: usize,
}

/// What [`Endpoint::retire`] did.
pub(crate) struct Retired {
    /// Pieces that never reached a QP.
    pub(crate) pieces: Vec<Piece>,
    /// This call retired the endpoint (false: it already was).
    pub(crate) now: bool,
    /// A QP could not be moved to ERR: its requests will never flush.
    pub(crate) stuck: bool,
}

/// Where the second phase of destroy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// Requests are still outstanding.
    Draining,
    /// Released with nothing outstanding.
    Drained,
    /// Released with requests outstanding: they will never complete.
    Forced,
}

/// The QPs between one local device and one peer NIC path.
pub(crate) struct Endpoint {
    pub(crate) local_path: String,
    pub(crate) peer_path: String,
    pd: Arc<dyn ProtectionDomain>,
    cq: Arc<dyn CompletionQueue>,
    cap: QpCap,
    num_qp: usize,
    port: u8,
    inner: Mutex<EndpointInner>,
    /// Posted requests not yet completed, all QPs.
    pub(crate) outstanding: AtomicUsize,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_path", &self.local_path)
            .field("peer_path", &self.peer_path)
            .field("state", &self.state())
            .finish()
    }
}

impl Endpoint {
    /// An endpoint with `num_qp` fresh QPs in INIT.
    pub(crate) fn new(
        local_path: String,
        peer_path: String,
        pd: Arc<dyn ProtectionDomain>,
        cq: Arc<dyn CompletionQueue>,
        num_qp: usize,
        max_wr: u32,
        port: u8,
    ) -> Result<Arc<Self>> {
        let cap = QpCap {
            max_send_wr: max_wr,
            max_recv_wr: max_wr,
            max_sge: 4,
            max_inline: 64,
        };
        let qps = make_qps(&pd, &cq, cap, num_qp, port)?;
        Ok(Arc::new(Self {
            local_path,
            peer_path,
            pd,
            cq,
            cap,
            num_qp,
            port,
            inner: Mutex::new(EndpointInner {
                state: EndpointState::Unconnected,
                depth: vec![0; qps.len()],
                qps,
                peer_qpns: None,
                dirty: false,
                has_connected: false,
                connecting: false,
                pending: Vec::new(),
                backlog: VecDeque::new(),
                since: Instant::now(),
                next_qp: 0,
            }),
            outstanding: AtomicUsize::new(0),
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, EndpointInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current state.
    pub(crate) fn state(&self) -> EndpointState {
        self.lock().state
    }

    /// Local QP numbers.
    pub(crate) fn qp_nums(&self) -> Vec<u32> {
        self.lock().qps.iter().map(|q| q.qp_num()).collect()
    }

    /// Peer QP numbers, once known.
    pub(crate) fn peer_qp_nums(&self) -> Option<Vec<u32>> {
        self.lock().peer_qpns.clone()
    }

    fn set_state(inner: &mut EndpointInner, state: EndpointState) {
        inner.state = state;
        inner.since = Instant::now();
    }

    fn rebuild_if_dirty(&self, inner: &mut EndpointInner) -> Result<()> {
        if inner.dirty {
            inner.qps = make_qps(&self.pd, &self.cq, self.cap, self.num_qp, self.port)?;
            inner.depth = vec![0; inner.qps.len()];
            inner.peer_qpns = None;
            inner.dirty = false;
        }
        Ok(())
    }

    fn request(
        &self,
        inner: &EndpointInner,
        link: &LinkInfo,
        ready_ack: bool,
    ) -> ConnectionMessage {
        ConnectionMessage {
            local_gid: gid_to_string(&link.gid),
            local_lid: link.lid,
            local_nic_path: self.local_path.clone(),
            payload: String::new(),
            peer_nic_path: self.peer_path.clone(),
            qp_num: inner.qps.iter().map(|q| q.qp_num()).collect(),
            ready_ack: Some(ready_ack),
            reply_msg: String::new(),
        }
    }

    /// Connects every QP to the peer's (RTR, then RTS).
    fn connect_qps(
        &self,
        inner: &mut EndpointInner,
        link: &LinkInfo,
        peer_gid: [u8; 16],
        peer_lid: u16,
        peer_qpns: &[u32],
    ) -> Result<()> {
        if peer_qpns.len() != inner.qps.len() {
            return Err(Error::new(
                ErrorKind::RejectHandshake,
                format!(
                    "QP count mismatch: {} local, {} remote; check MC_NUM_QP_PER_EP",
                    inner.qps.len(),
                    peer_qpns.len()
                ),
            ));
        }
        inner.dirty = true;
        for (qp, &dest) in inner.qps.iter().zip(peer_qpns) {
            qp.modify(QpTransition::Rtr(RtrAttr {
                port: link.port,
                mtu: link.mtu,
                dest_qp_num: dest,
                dest_gid: peer_gid,
                dest_lid: peer_lid,
                sgid_index: link.gid_index,
            }))?;
            qp.modify(QpTransition::Rts)?;
        }
        inner.peer_qpns = Some(peer_qpns.to_vec());
        Ok(())
    }

    /// Active side, step 1: claim the handshake and build the request (`ready_ack: false`).
    pub(crate) fn begin_active(&self, link: &LinkInfo) -> Result<ActiveStart> {
        let mut inner = self.lock();
        match inner.state {
            EndpointState::Connected => return Ok(ActiveStart::Connected),
            EndpointState::ConnectedWaitReadyAck => return Ok(ActiveStart::WaitForAck),
            EndpointState::Destroying | EndpointState::Destroyed => {
                return Ok(ActiveStart::Retired)
            }
            EndpointState::Unconnected | EndpointState::Connecting => {}
        }
        if inner.peer_qpns.is_none() {
            self.rebuild_if_dirty(&mut inner)?;
        }
        Self::set_state(&mut inner, EndpointState::Connecting);
        Ok(ActiveStart::Send(self.request(&inner, link, false)))
    }

    /// Loopback: the peer NIC path is our own; the QPs connect to themselves.
    pub(crate) fn connect_loopback(&self, link: &LinkInfo) -> Result<()> {
        let mut inner = self.lock();
        if inner.peer_qpns.is_some() {
            return Ok(());
        }
        let own: Vec<u32> = inner.qps.iter().map(|q| q.qp_num()).collect();
        self.connect_qps(&mut inner, link, link.gid, link.lid, &own)
    }

    /// Active side, step 2: validate the reply and connect the QPs (unless a simultaneous
    /// passive handshake already connected them to the same peer QPs).
    pub(crate) fn complete_active(
        &self,
        reply: &ConnectionMessage,
        link: &LinkInfo,
        fallback_gid: Option<[u8; 16]>,
    ) -> Result<()> {
        if !reply.reply_msg.is_empty() {
            return Err(Error::new(
                ErrorKind::RejectHandshake,
                format!(
                    "{} rejected the connection: {}",
                    self.peer_path, reply.reply_msg
                ),
            ));
        }
        if reply.local_nic_path != self.peer_path || reply.peer_nic_path != self.local_path {
            return Err(Error::new(
                ErrorKind::RejectHandshake,
                format!(
                    "reply paths {} -> {} do not mirror {} -> {}",
                    reply.local_nic_path, reply.peer_nic_path, self.local_path, self.peer_path
                ),
            ));
        }
        let mut inner = self.lock();
        if matches!(
            inner.state,
            EndpointState::Destroying | EndpointState::Destroyed
        ) {
            return Err(Error::new(
                ErrorKind::Endpoint,
                format!(
                    "endpoint to {} was retired while connecting",
                    self.peer_path
                ),
            ));
        }
        match &inner.peer_qpns {
            Some(known) if *known == reply.qp_num => Ok(()),
            Some(_) => Err(Error::new(
                ErrorKind::Endpoint,
                format!(
                    "{} answered with new QP numbers (peer restarted)",
                    self.peer_path
                ),
            )),
            None => {
                let gid = crate::verbs::parse_gid(&reply.local_gid)
                    .or(fallback_gid)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::RejectHandshake,
                            format!("{} sent no usable GID", self.peer_path),
                        )
                    })?;
                self.connect_qps(&mut inner, link, gid, reply.local_lid, &reply.qp_num)
            }
        }
    }

    /// The second request of the active side (`ready_ack: true`, same QP numbers).
    pub(crate) fn ready_ack(&self, link: &LinkInfo) -> ConnectionMessage {
        let inner = self.lock();
        self.request(&inner, link, true)
    }

    /// Active side, last step (or the ack arrived): the endpoint may post. Returns the
    /// pieces that waited for it and releases the connect claim.
    pub(crate) fn mark_connected(&self) -> Result<Vec<Piece>, Vec<Piece>> {
        let mut inner = self.lock();
        inner.connecting = false;
        let pending = std::mem::take(&mut inner.pending);
        match inner.state {
            EndpointState::Destroying | EndpointState::Destroyed => Err(pending),
            _ => {
                Self::set_state(&mut inner, EndpointState::Connected);
                inner.has_connected = true;
                Ok(pending)
            }
        }
    }

    /// Releases the connect claim without connecting; returns the waiting pieces.
    /// Whether the endpoint must now be retired (it had been connected) is returned too.
    pub(crate) fn active_failed(&self) -> (Vec<Piece>, bool) {
        let mut inner = self.lock();
        inner.connecting = false;
        let pending = std::mem::take(&mut inner.pending);
        let retire = inner.has_connected;
        if !retire && inner.state == EndpointState::Connecting {
            Self::set_state(&mut inner, EndpointState::Unconnected);
            inner.peer_qpns = None;
        }
        (pending, retire)
    }

    /// Passive side: connect to the requester's QPs (or reuse them) and return ours.
    pub(crate) fn accept(
        &self,
        request: &ConnectionMessage,
        link: &LinkInfo,
        peer_gid: [u8; 16],
    ) -> Result<Vec<u32>, AcceptError> {
        let mut inner = self.lock();
        if matches!(
            inner.state,
            EndpointState::Destroying | EndpointState::Destroyed
        ) {
            return Err(AcceptError::Retired);
        }
        match &inner.peer_qpns {
            Some(known) if *known == request.qp_num => {}
            Some(_) => return Err(AcceptError::PeerRestarted),
            None => {
                if inner.state == EndpointState::Unconnected {
                    self.rebuild_if_dirty(&mut inner)
                        .map_err(AcceptError::Failed)?;
                }
                if let Err(e) = self.connect_qps(
                    &mut inner,
                    link,
                    peer_gid,
                    request.local_lid,
                    &request.qp_num,
                ) {
                    inner.peer_qpns = None;
                    return Err(AcceptError::Failed(e));
                }
            }
        }
        // While our own active handshake runs, it finishes the state machine.
        if inner.state == EndpointState::Unconnected {
            if request.ready_ack.is_some() {
                Self::set_state(&mut inner, EndpointState::ConnectedWaitReadyAck);
            } else {
                Self::set_state(&mut inner, EndpointState::Connected);
                inner.has_connected = true;
            }
        }
        Ok(inner.qps.iter().map(|q| q.qp_num()).collect())
    }

    /// Passive side: the requester's ready-ack.
    pub(crate) fn on_ready_ack(&self, request: &ConnectionMessage) -> Result<()> {
        let mut inner = self.lock();
        if inner.peer_qpns.as_deref() != Some(&request.qp_num[..]) {
            return Err(Error::new(
                ErrorKind::RejectHandshake,
                format!("ready-ack from {} names unknown QPs", self.peer_path),
            ));
        }
        match inner.state {
            EndpointState::ConnectedWaitReadyAck => {
                Self::set_state(&mut inner, EndpointState::Connected);
                inner.has_connected = true;
                Ok(())
            }
            EndpointState::Connected | EndpointState::Connecting => Ok(()),
            state => Err(Error::new(
                ErrorKind::RejectHandshake,
                format!("ready-ack from {} in state {state:?}", self.peer_path),
            )),
        }
    }

    /// Whether a passive endpoint waited longer than `timeout` for its ready-ack.
    pub(crate) fn ack_overdue(&self, timeout: std::time::Duration) -> bool {
        let inner = self.lock();
        inner.state == EndpointState::ConnectedWaitReadyAck && inner.since.elapsed() > timeout
    }

    /// First phase of destroy: QPs to ERR (in-flight requests flush), state DESTROYING.
    /// Idempotent.
    pub(crate) fn retire(&self) -> Retired {
        let mut inner = self.lock();
        if matches!(
            inner.state,
            EndpointState::Destroying | EndpointState::Destroyed
        ) {
            return Retired {
                pieces: Vec::new(),
                now: false,
                stuck: false,
            };
        }
        Self::set_state(&mut inner, EndpointState::Destroying);
        let mut stuck = false;
        for qp in &inner.qps {
            if let Err(e) = qp.modify(QpTransition::Err) {
                tracing::warn!(peer = %self.peer_path, "QP {} to ERR: {e}", qp.qp_num());
                stuck = true;
            }
        }
        let mut pieces = std::mem::take(&mut inner.pending);
        pieces.extend(inner.backlog.drain(..));
        Retired {
            pieces,
            now: true,
            stuck,
        }
    }

    /// Second phase of destroy: releases the QPs once drained, or `timeout` after the
    /// retirement regardless.
    pub(crate) fn try_finish_destroy(&self, timeout: std::time::Duration) -> Teardown {
        let mut inner = self.lock();
        if inner.state == EndpointState::Destroyed {
            return Teardown::Drained;
        }
        let drained = self.outstanding.load(Ordering::Acquire) == 0;
        if drained || inner.since.elapsed() > timeout {
            if !drained {
                tracing::warn!(peer = %self.peer_path, "destroying an endpoint with requests still outstanding");
            }
            Self::release_qps(&mut inner);
            return if drained {
                Teardown::Drained
            } else {
                Teardown::Forced
            };
        }
        Teardown::Draining
    }

    /// Releases the QPs now, drained or not. Returns the pieces that never reached a QP.
    pub(crate) fn destroy_now(&self) -> Vec<Piece> {
        let mut inner = self.lock();
        Self::release_qps(&mut inner);
        let mut pieces = std::mem::take(&mut inner.pending);
        pieces.extend(inner.backlog.drain(..));
        pieces
    }

    fn release_qps(inner: &mut EndpointInner) {
        if inner.state != EndpointState::Destroyed {
            Self::set_state(inner, EndpointState::Destroyed);
        }
        inner.qps.clear();
        inner.depth.clear();
    }

    /// Takes the waiting pieces whose deadline passed at `now`.
    pub(crate) fn take_expired(&self, now: tokio::time::Instant) -> Vec<Piece> {
        let mut inner = self.lock();
        if inner.pending.is_empty() && inner.backlog.is_empty() {
            return Vec::new();
        }
        let mut expired = Vec::new();
        let pending = std::mem::take(&mut inner.pending);
        for piece in pending {
            if piece.expired(now) {
                expired.push(piece);
            } else {
                inner.pending.push(piece);
            }
        }
        let backlog = std::mem::take(&mut inner.backlog);
        for piece in backlog {
            if piece.expired(now) {
                expired.push(piece);
            } else {
                inner.backlog.push_back(piece);
            }
        }
        expired
    }
}

fn make_qps(
    pd: &Arc<dyn ProtectionDomain>,
    cq: &Arc<dyn CompletionQueue>,
    cap: QpCap,
    num: usize,
    port: u8,
) -> Result<Vec<Arc<dyn QueuePair>>> {
    (0..num)
        .map(|_| {
            let qp = pd.create_qp(cq, cap)?;
            qp.modify(QpTransition::Init {
                port,
                pkey_index: 0,
            })?;
            Ok(qp)
        })
        .collect()
}
